/*
 * Reference echo server on io_uring: the ceiling for a completion-based server on this machine.
 *
 * One thread, one ring set up with SINGLE_ISSUER | DEFER_TASKRUN where the kernel has them (completions are then run
 * only when this thread waits, in a batch, instead of interrupting it), and COOP_TASKRUN otherwise. One multishot
 * accept stays armed for the whole run. Each connection alternates one recv and one send of what was received into
 * its own buffer: the same syscall-free shape as the epoll server's read+write, but the wait and all submissions of a
 * loop turn are one io_uring_enter. A short send resubmits the rest before the next recv, so replies stay in order.
 *
 * user_data is the connection's address with the op kind in its low two bits (a connection is at least 8-byte
 * aligned); the accept and the poll on the stop signalfd use the null connection.
 */
#define _GNU_SOURCE   /* SOCK_CLOEXEC and the GNU socket flags */
#include <liburing.h>
#include <poll.h>
#include <stdint.h>

#include "echo_common.h"

#define RING_ENTRIES 4096

enum op_kind { OP_ACCEPT = 0, OP_RECV = 1, OP_SEND = 2, OP_STOP = 3 };

struct connection {
    int fd;
    size_t send_offset;
    size_t send_length;
    char buffer[ECHO_BUFFER_SIZE];
};

static struct io_uring ring;
static int stopping;

/* Get an SQE, flushing the submission queue to the kernel first if it is full. */
static struct io_uring_sqe *get_sqe(void)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    if (sqe == NULL) {
        io_uring_submit(&ring);
        sqe = io_uring_get_sqe(&ring);
    }
    return sqe;
}

static void tag(struct io_uring_sqe *sqe, struct connection *connection, enum op_kind kind)
{
    io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)connection | (uint64_t)kind);
}

static void arm_accept(int listen_fd)
{
    struct io_uring_sqe *sqe = get_sqe();
    io_uring_prep_multishot_accept(sqe, listen_fd, NULL, NULL, SOCK_CLOEXEC);
    tag(sqe, NULL, OP_ACCEPT);
}

static void arm_stop(int stop_fd)
{
    struct io_uring_sqe *sqe = get_sqe();
    io_uring_prep_poll_add(sqe, stop_fd, POLLIN);
    tag(sqe, NULL, OP_STOP);
}

static void queue_recv(struct connection *connection)
{
    struct io_uring_sqe *sqe = get_sqe();
    io_uring_prep_recv(sqe, connection->fd, connection->buffer, sizeof connection->buffer, 0);
    tag(sqe, connection, OP_RECV);
}

static void queue_send(struct connection *connection)
{
    struct io_uring_sqe *sqe = get_sqe();
    io_uring_prep_send(sqe, connection->fd, connection->buffer + connection->send_offset,
                       connection->send_length - connection->send_offset, MSG_NOSIGNAL);
    tag(sqe, connection, OP_SEND);
}

static void close_connection(struct connection *connection)
{
    close(connection->fd);
    free(connection);
}

static void on_completion(int listen_fd, const struct io_uring_cqe *cqe)
{
    uint64_t data = io_uring_cqe_get_data64(cqe);
    enum op_kind kind = (enum op_kind)(data & 3);
    struct connection *connection = (struct connection *)(uintptr_t)(data & ~(uint64_t)3);
    int result = cqe->res;

    switch (kind) {
    case OP_STOP:
        stopping = 1;
        return;
    case OP_ACCEPT:
        if (!(cqe->flags & IORING_CQE_F_MORE))
            arm_accept(listen_fd);   /* the multishot accept ended (error or overflow): arm a new one */
        if (result < 0)
            return;
        connection = malloc(sizeof *connection);
        if (connection == NULL) {
            close(result);
            return;
        }
        connection->fd = result;
        echo_set_nodelay(result);
        queue_recv(connection);
        return;
    case OP_RECV:
        if (result <= 0) {   /* end of stream or reset */
            close_connection(connection);
            return;
        }
        connection->send_offset = 0;
        connection->send_length = (size_t)result;
        queue_send(connection);
        return;
    case OP_SEND:
        if (result < 0) {
            close_connection(connection);
            return;
        }
        connection->send_offset += (size_t)result;
        if (connection->send_offset < connection->send_length)
            queue_send(connection);
        else
            queue_recv(connection);
        return;
    }
}

static void setup_ring(void)
{
    struct io_uring_params params;
    memset(&params, 0, sizeof params);
    params.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    int error = io_uring_queue_init_params(RING_ENTRIES, &ring, &params);
    if (error == -EINVAL) {   /* kernel older than 6.1: fall back to cooperative task running */
        memset(&params, 0, sizeof params);
        params.flags = IORING_SETUP_COOP_TASKRUN;
        error = io_uring_queue_init_params(RING_ENTRIES, &ring, &params);
    }
    if (error < 0) {
        fprintf(stderr, "io_uring_queue_init_params: %s\n", strerror(-error));
        exit(1);
    }
}

int main(int argc, char **argv)
{
    struct echo_options options = echo_parse_options(argc, argv, "ref:c-uring");
    int stop_fd = echo_stop_signal_fd();
    setup_ring();
    int listen_fd = echo_open_listener(&options, 0);
    arm_accept(listen_fd);
    arm_stop(stop_fd);

    while (!stopping) {
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        int error = io_uring_submit_and_wait(&ring, 1);
        if (error < 0 && error != -EINTR && error != -EAGAIN && error != -EBUSY) {
            fprintf(stderr, "io_uring_submit_and_wait: %s\n", strerror(-error));
            break;
        }
        io_uring_for_each_cqe(&ring, head, cqe) {
            on_completion(listen_fd, cqe);
            seen++;
        }
        io_uring_cq_advance(&ring, seen);
    }
    io_uring_queue_exit(&ring);
    close(listen_fd);
    close(stop_fd);
    return 0;
}
