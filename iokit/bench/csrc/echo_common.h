/*
 * What the two reference echo servers (echo_epoll.c, echo_uring.c) share: the command line, the listening socket, the
 * ready line and the stop signal. They exist to show the ceiling a single-threaded C server reaches on this machine,
 * so everything here is plain and done once at start-up; nothing in this file is on the per-message path.
 *
 * Command line:  NAME --host 127.0.0.1 --port 0 [--label ref:c-epoll]
 * Ready line:    "listening on HOST:PORT backend=LABEL" on stdout (the contract of every example server), then the
 *                server runs until SIGINT or SIGTERM and exits 0.
 */
#ifndef IOKIT_BENCH_ECHO_COMMON_H
#define IOKIT_BENCH_ECHO_COMMON_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

/*
 * As much as asyncio reads at once (256 KiB), so a pipelined burst of 16 KiB messages takes one receive. The buffer is
 * malloc'd per connection; only the pages a receive writes become resident, so an idle connection costs a page or two.
 */
#define ECHO_BUFFER_SIZE (256 * 1024)
#define ECHO_BACKLOG 4096

struct echo_options {
    const char *host;
    int port;
    const char *label;
};

/*
 * SIGINT and SIGTERM are blocked and read from a signalfd that the event loop waits on like any other fd. A flag set by
 * a handler would race with the wait (a signal landing between the flag check and the wait is noticed only at the
 * next event, so an idle server would never stop); an fd in the wait set cannot be missed.
 */
static int echo_stop_signal_fd(void)
{
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    sigprocmask(SIG_BLOCK, &stop_signals, NULL);
    signal(SIGPIPE, SIG_IGN);
    int fd = signalfd(-1, &stop_signals, SFD_CLOEXEC | SFD_NONBLOCK);
    if (fd < 0) {
        perror("signalfd");
        exit(1);
    }
    return fd;
}

static void echo_usage_exit(const char *program)
{
    fprintf(stderr, "usage: %s [--host 127.0.0.1] [--port 0] [--label NAME]\n", program);
    exit(2);
}

static struct echo_options echo_parse_options(int argc, char **argv, const char *default_label)
{
    struct echo_options options = {"127.0.0.1", 0, default_label};
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            echo_usage_exit(argv[0]);
        if (strcmp(argv[i], "--host") == 0)
            options.host = argv[++i];
        else if (strcmp(argv[i], "--port") == 0)
            options.port = atoi(argv[++i]);
        else if (strcmp(argv[i], "--label") == 0)
            options.label = argv[++i];
        else
            echo_usage_exit(argv[0]);
    }
    return options;
}

/* Bind and listen; print the ready line with the port the kernel chose. Exits on failure: nothing to serve. */
static int echo_open_listener(const struct echo_options *options, int nonblocking)
{
    struct sockaddr_in address;
    socklen_t length = sizeof address;
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) {
        perror("socket");
        exit(1);
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_port = htons((unsigned short)options->port);
    if (inet_pton(AF_INET, options->host, &address.sin_addr) != 1) {
        fprintf(stderr, "not a numeric IPv4 address: %s\n", options->host);
        exit(2);
    }
    if (bind(fd, (struct sockaddr *)&address, sizeof address) < 0 || listen(fd, ECHO_BACKLOG) < 0) {
        perror("bind/listen");
        exit(1);
    }
    getsockname(fd, (struct sockaddr *)&address, &length);
    printf("listening on %s:%d backend=%s\n", options->host, ntohs(address.sin_port), options->label);
    fflush(stdout);
    return fd;
}

/* Echo traffic is small request/response: send each reply at once rather than waiting to coalesce (Nagle). */
static void echo_set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

#endif
