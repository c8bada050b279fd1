/*
 * Reference echo server on epoll: the ceiling for a readiness-based server on this machine.
 *
 * One thread, level-triggered epoll. On readiness a connection gets one read() and one write() of what was read: level
 * triggering reports the socket again if more is waiting, so there is no read-until-EAGAIN (that would cost an extra
 * syscall per wake-up that returns nothing). A short write parks the rest and switches the interest to EPOLLOUT only,
 * which stops reading from a client that does not read its replies (backpressure) until the rest is written.
 */
#define _GNU_SOURCE   /* accept4, SOCK_NONBLOCK */
#include <sys/epoll.h>

#include "echo_common.h"

struct connection {
    int fd;
    size_t pending_offset;   /* bytes of buffer[] already written back */
    size_t pending_length;   /* bytes of buffer[] to write back; 0 when waiting for input */
    char buffer[ECHO_BUFFER_SIZE];
};

static void set_interest(int epoll_fd, struct connection *connection, unsigned events)
{
    struct epoll_event event = {.events = events, .data.ptr = connection};
    epoll_ctl(epoll_fd, EPOLL_CTL_MOD, connection->fd, &event);
}

static void close_connection(struct connection *connection)
{
    close(connection->fd);   /* also removes it from the epoll set */
    free(connection);
}

static void accept_all(int epoll_fd, int listen_fd)
{
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;   /* EAGAIN: the backlog is empty (other errors: the client gave up; nothing to do) */
        struct connection *connection = malloc(sizeof *connection);
        if (connection == NULL) {
            close(fd);
            continue;
        }
        connection->fd = fd;
        connection->pending_offset = connection->pending_length = 0;
        echo_set_nodelay(fd);
        struct epoll_event event = {.events = EPOLLIN, .data.ptr = connection};
        if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event) < 0)
            close_connection(connection);
    }
}

/* Write what is pending. Returns 0 when all is written, 1 when the socket is full, -1 when the peer is gone. */
static int flush_pending(struct connection *connection)
{
    while (connection->pending_offset < connection->pending_length) {
        ssize_t sent = send(connection->fd, connection->buffer + connection->pending_offset,
                            connection->pending_length - connection->pending_offset, MSG_NOSIGNAL);
        if (sent < 0)
            return (errno == EAGAIN || errno == EINTR) ? 1 : -1;
        connection->pending_offset += (size_t)sent;
    }
    connection->pending_offset = connection->pending_length = 0;
    return 0;
}

static void on_ready(int epoll_fd, struct connection *connection, unsigned events)
{
    int state;
    if (connection->pending_length > 0) {   /* waiting for EPOLLOUT to finish an earlier reply */
        state = flush_pending(connection);
        if (state < 0)
            close_connection(connection);
        else if (state == 0)
            set_interest(epoll_fd, connection, EPOLLIN);
        return;
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
        return;
    ssize_t received = recv(connection->fd, connection->buffer, sizeof connection->buffer, 0);
    if (received < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (received <= 0) {   /* end of stream or reset */
        close_connection(connection);
        return;
    }
    connection->pending_length = (size_t)received;
    state = flush_pending(connection);
    if (state < 0)
        close_connection(connection);
    else if (state == 1)
        set_interest(epoll_fd, connection, EPOLLOUT);
}

int main(int argc, char **argv)
{
    struct echo_options options = echo_parse_options(argc, argv, "ref:c-epoll");
    struct epoll_event events[256];
    static char stop_marker;   /* data.ptr of the signalfd: an address no connection has */
    int stop_fd = echo_stop_signal_fd();
    int listen_fd = echo_open_listener(&options, 1);
    int epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event listen_event = {.events = EPOLLIN, .data.ptr = NULL};
    struct epoll_event stop_event = {.events = EPOLLIN, .data.ptr = &stop_marker};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, listen_fd, &listen_event);
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, stop_fd, &stop_event);

    for (int stopping = 0; !stopping;) {
        int count = epoll_wait(epoll_fd, events, 256, -1);
        for (int i = 0; i < count; i++) {
            if (events[i].data.ptr == NULL)
                accept_all(epoll_fd, listen_fd);
            else if (events[i].data.ptr == &stop_marker)
                stopping = 1;
            else
                on_ready(epoll_fd, events[i].data.ptr, events[i].events);
        }
    }
    close(epoll_fd);
    close(listen_fd);
    close(stop_fd);
    return 0;
}
