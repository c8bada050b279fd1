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
#include <sys/socket.h>
#include <unistd.h>

/* Large enough that one receive takes a whole pipelined burst of 16 KiB messages. */
#define ECHO_BUFFER_SIZE 65536
#define ECHO_BACKLOG 4096

struct echo_options {
    const char *host;
    int port;
    const char *label;
};

static volatile sig_atomic_t echo_stop_requested;

static void echo_on_stop_signal(int signo)
{
    (void)signo;
    echo_stop_requested = 1;
}

/* No SA_RESTART: the blocking wait (epoll_wait, io_uring_enter) must return EINTR so the loop sees the flag. */
static void echo_install_stop_signals(void)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = echo_on_stop_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
    signal(SIGPIPE, SIG_IGN);
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
