/*
 * Load generator for the socket workloads: N connections, each keeping DEPTH messages in flight (1 = ping-pong), for
 * a warm-up and then RUNS timed runs; prints one JSON line when the warm-up ends and one per run with the count and
 * the latency percentiles (the caller samples the server's CPU counters at each line).
 *
 * Why C, single-threaded, on epoll: the client must not be what limits the measurement. A Python client tops out near
 * the servers it is meant to load; this one, pinned to the other core, keeps ~300k round trips/s going. It is closed
 * loop (a new message leaves only when one comes back), so latency is measured from the moment a message is queued
 * to the moment its last echoed byte arrives; with pipelining that includes the wait behind earlier messages.
 *
 * Modes:
 *   echo (default)  messages of --size bytes; the server sends back the same bytes (a byte stream: every --size bytes
 *                   received complete the oldest message in flight).
 *   --http PATH     HTTP/1.1 keep-alive GET requests; a response is complete after its header and Content-Length body.
 *   --idle          connect, make one round trip per connection (so the server has served each), print one line,
 *                   then hold the connections open until stdin is closed or --duration passes. For memory per client.
 *
 * Connections are opened in batches of 256, each completing one round trip before the next batch, so the server's
 * accept queue never overflows (an overflow costs a 1 s SYN retransmit and would distort a short run).
 *
 * Every loop is bounded: an alarm ends the process if the whole run overstays its planned time by 30 s.
 */
#define _GNU_SOURCE   /* memmem, SOCK_NONBLOCK */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CONNECT_BATCH 256
#define RECEIVE_BUFFER_SIZE (256 * 1024)
#define HISTOGRAM_BUCKETS 4096

/* --- options ------------------------------------------------------------------------------------------------------ */

struct options {
    const char *host;
    int port;
    int connections;
    size_t size;
    int depth;
    double warmup;
    double duration;
    int runs;
    const char *http_path;
    int idle;
    double connect_timeout;
    double stall_timeout;
};

static void usage_exit(const char *program)
{
    fprintf(stderr,
            "usage: %s --port PORT [--host 127.0.0.1] [--connections N] [--size BYTES] [--depth N]\n"
            "          [--warmup SEC] [--duration SEC] [--runs N] [--http PATH | --idle] [--connect-timeout SEC]\n"
            "          [--stall-timeout SEC]\n",
            program);
    exit(2);
}

static struct options parse_options(int argc, char **argv)
{
    struct options o = {"127.0.0.1", 0, 1, 64, 1, 0.5, 1.0, 3, NULL, 0, 30.0, 3.0};
    for (int i = 1; i < argc; i++) {
        const char *name = argv[i];
        if (strcmp(name, "--idle") == 0) {
            o.idle = 1;
            continue;
        }
        if (i + 1 >= argc)
            usage_exit(argv[0]);
        const char *value = argv[++i];
        if (strcmp(name, "--host") == 0) o.host = value;
        else if (strcmp(name, "--port") == 0) o.port = atoi(value);
        else if (strcmp(name, "--connections") == 0) o.connections = atoi(value);
        else if (strcmp(name, "--size") == 0) o.size = (size_t)atol(value);
        else if (strcmp(name, "--depth") == 0) o.depth = atoi(value);
        else if (strcmp(name, "--warmup") == 0) o.warmup = atof(value);
        else if (strcmp(name, "--duration") == 0) o.duration = atof(value);
        else if (strcmp(name, "--runs") == 0) o.runs = atoi(value);
        else if (strcmp(name, "--http") == 0) o.http_path = value;
        else if (strcmp(name, "--connect-timeout") == 0) o.connect_timeout = atof(value);
        else if (strcmp(name, "--stall-timeout") == 0) o.stall_timeout = atof(value);
        else usage_exit(argv[0]);
    }
    if (o.port <= 0 || o.connections < 1 || o.size < 1 || o.depth < 1 || o.runs < 1 || o.duration <= 0 ||
        o.warmup < 0)
        usage_exit(argv[0]);
    return o;
}

/* --- time and the latency histogram ------------------------------------------------------------------------------ */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/*
 * Log-linear buckets (as HdrHistogram): values below 128 ns are exact; above, each power of two is split in 64, so a
 * bucket is at most 1/64 (1.6%) wide. 4096 buckets reach far beyond any latency a run can see.
 */
static unsigned bucket_of(uint64_t value)
{
    if (value < 128)
        return (unsigned)value;
    unsigned shift = (unsigned)(63 - __builtin_clzll(value)) - 6;
    unsigned index = shift * 64 + (unsigned)(value >> shift);
    return index < HISTOGRAM_BUCKETS ? index : HISTOGRAM_BUCKETS - 1;
}

static double bucket_middle(unsigned index)
{
    if (index < 128)
        return index;
    unsigned shift = index / 64 - 1;
    uint64_t low = (uint64_t)(index - shift * 64) << shift;
    return (double)low + (double)((uint64_t)1 << shift) / 2.0;
}

struct statistics {
    uint64_t operations;
    uint64_t bytes;
    uint64_t errors;
    uint64_t max_latency;
    uint64_t histogram[HISTOGRAM_BUCKETS];
};

static double percentile_us(const struct statistics *s, double percent)
{
    if (s->operations == 0)
        return 0.0;
    uint64_t rank = (uint64_t)ceil(percent / 100.0 * (double)s->operations);
    uint64_t seen = 0;
    for (unsigned i = 0; i < HISTOGRAM_BUCKETS; i++) {
        seen += s->histogram[i];
        if (seen >= rank && s->histogram[i] > 0)
            return bucket_middle(i) / 1000.0;
    }
    return (double)s->max_latency / 1000.0;
}

/* --- connections --------------------------------------------------------------------------------------------------- */

struct connection {
    int fd;
    int alive;
    int greeted;                /* has made its first round trip (the connect phase) */
    unsigned interest;          /* the epoll events registered */
    int in_flight;              /* messages queued or sent and not yet answered */
    uint64_t unsent;            /* bytes queued and not yet accepted by send() */
    size_t send_position;       /* where in the repeating message the next unsent byte is */
    size_t received_partial;    /* echo: bytes received of the oldest message in flight */
    int oldest;                 /* index in sent_at of the oldest message in flight */
    uint64_t *sent_at;          /* ring of DEPTH queue times */
    char *response;             /* http: bytes of responses received and not yet parsed */
    size_t response_length;
};

static struct options options;
static struct connection *connections;
static int epoll_fd;
static char *outgoing;          /* the message repeated DEPTH+1 times: any window of unsent bytes is contiguous */
static size_t message_length;
static char *receive_buffer;
static struct statistics current;
static int recording;           /* completions count only inside a timed run */
static int sending;             /* new messages are queued only while the load runs */
static int greeted;             /* connections that completed their first round trip */
static int alive;               /* connections still open */

static void fail(const char *message, int error)
{
    printf("{\"error\": \"%s%s%s\"}\n", message, error ? ": " : "", error ? strerror(error) : "");
    fflush(stdout);
    exit(1);
}

static void set_interest(struct connection *c, unsigned events)
{
    if (c->interest == events)
        return;
    struct epoll_event event = {.events = events, .data.ptr = c};
    epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c->fd, &event);
    c->interest = events;
}

static void drop(struct connection *c)
{
    if (!c->alive)
        return;
    c->alive = 0;
    alive--;
    current.errors++;
    close(c->fd);
}

static void queue_message(struct connection *c, uint64_t now)
{
    c->sent_at[(c->oldest + c->in_flight) % options.depth] = now;
    c->in_flight++;
    c->unsent += message_length;
}

static void flush_outgoing(struct connection *c)
{
    while (c->unsent > 0) {
        ssize_t sent = send(c->fd, outgoing + c->send_position, c->unsent, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                set_interest(c, EPOLLIN | EPOLLOUT);
                return;
            }
            drop(c);
            return;
        }
        c->unsent -= (uint64_t)sent;
        c->send_position = (c->send_position + (size_t)sent) % message_length;
    }
    set_interest(c, EPOLLIN);
}

static void complete_message(struct connection *c, uint64_t now)
{
    uint64_t latency = now - c->sent_at[c->oldest];
    c->oldest = (c->oldest + 1) % options.depth;
    c->in_flight--;
    if (!c->greeted) {
        c->greeted = 1;
        greeted++;
        return;
    }
    if (!recording)
        return;
    current.operations++;
    current.histogram[bucket_of(latency)]++;
    if (latency > current.max_latency)
        current.max_latency = latency;
}

/* Echo: the reply is a byte stream; every message_length bytes complete the oldest message. */
static int consume_echo(struct connection *c, size_t received, uint64_t now)
{
    c->received_partial += received;
    while (c->received_partial >= message_length) {
        if (c->in_flight == 0)
            return -1;   /* more bytes than were sent: not an echo server */
        c->received_partial -= message_length;
        complete_message(c, now);
    }
    return 0;
}

/* The value of a header in [start, end), or -1. Names compare case-insensitively (RFC 9110). */
static long header_value(const char *start, const char *end, const char *name)
{
    size_t name_length = strlen(name);
    for (const char *line = start; line < end;) {
        const char *line_end = memmem(line, (size_t)(end - line), "\r\n", 2);
        if (line_end == NULL)
            line_end = end;
        if ((size_t)(line_end - line) > name_length && strncasecmp(line, name, name_length) == 0 &&
            line[name_length] == ':')
            return strtol(line + name_length + 1, NULL, 10);
        line = line_end + 2;
    }
    return -1;
}

/* HTTP: parse as many whole responses as have arrived; keep the rest for the next receive. */
static int consume_http(struct connection *c, uint64_t now)
{
    for (;;) {
        char *header_end = memmem(c->response, c->response_length, "\r\n\r\n", 4);
        if (header_end == NULL)
            return c->response_length < RECEIVE_BUFFER_SIZE ? 0 : -1;
        size_t header_length = (size_t)(header_end - c->response) + 4;
        if (header_length < 12 || memcmp(c->response, "HTTP/1.", 7) != 0)
            return -1;
        int status = atoi(c->response + 9);
        if (header_value(c->response, header_end, "transfer-encoding") != -1)
            return -1;   /* only Content-Length framing is supported */
        long body = status == 100 ? 0 : header_value(c->response, header_end, "content-length");
        if (body < 0)
            body = 0;
        size_t total = header_length + (size_t)body;
        if (total > RECEIVE_BUFFER_SIZE)
            return -1;
        if (c->response_length < total)
            return 0;
        if (status != 100) {
            if (status < 200 || status >= 300)
                current.errors++;
            if (c->in_flight == 0)
                return -1;
            current.bytes += total;
            complete_message(c, now);
        }
        memmove(c->response, c->response + total, c->response_length - total);
        c->response_length -= total;
    }
}

static void on_readable(struct connection *c)
{
    char *into = options.http_path ? c->response + c->response_length : receive_buffer;
    size_t room = options.http_path ? RECEIVE_BUFFER_SIZE - c->response_length : RECEIVE_BUFFER_SIZE;
    ssize_t received = recv(c->fd, into, room, 0);
    if (received < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (received <= 0) {
        drop(c);
        return;
    }
    uint64_t now = now_ns();
    int state;
    if (options.http_path) {
        c->response_length += (size_t)received;
        state = consume_http(c, now);
    } else {
        if (recording)
            current.bytes += (uint64_t)received;
        state = consume_echo(c, (size_t)received, now);
    }
    if (state < 0) {
        drop(c);
        return;
    }
    if (sending) {
        while (c->in_flight < options.depth)
            queue_message(c, now);
        flush_outgoing(c);
    }
}

static void on_event(struct connection *c, unsigned events)
{
    if (!c->alive)
        return;
    if (events & EPOLLOUT) {
        if (!c->greeted) {   /* the non-blocking connect finished: did it work? */
            int error = 0;
            socklen_t length = sizeof error;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &error, &length);
            if (error != 0) {
                drop(c);
                return;
            }
        }
        flush_outgoing(c);
    }
    if (c->alive && events & (EPOLLIN | EPOLLHUP | EPOLLERR))
        on_readable(c);
}

static int poll_events(int timeout_ms)
{
    struct epoll_event events[512];
    int count = epoll_wait(epoll_fd, events, 512, timeout_ms);
    for (int i = 0; i < count; i++)
        on_event(events[i].data.ptr, events[i].events);
    return count;
}

static void open_connection(struct connection *c, const struct sockaddr_in *address)
{
    int one = 1;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        fail("socket", errno);
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (const struct sockaddr *)address, sizeof *address) < 0 && errno != EINPROGRESS)
        fail("connect", errno);
    c->alive = 1;
    alive++;
    c->interest = EPOLLIN | EPOLLOUT;
    c->sent_at = calloc((size_t)options.depth, sizeof *c->sent_at);
    if (options.http_path)
        c->response = malloc(RECEIVE_BUFFER_SIZE);
    struct epoll_event event = {.events = c->interest, .data.ptr = c};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, c->fd, &event);
    queue_message(c, now_ns());   /* the greeting round trip; flushed once the connect completes */
}

/*
 * Open every connection, in batches, each making one round trip. Returns the seconds it took. Fails when the whole
 * takes over --connect-timeout, or when no new connection is answered for --stall-timeout: a server whose workers are
 * all held by earlier connections (a bounded thread pool) never answers more, and waiting longer tells nothing.
 */
static double connect_all(void)
{
    struct sockaddr_in address;
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_port = htons((unsigned short)options.port);
    if (inet_pton(AF_INET, options.host, &address.sin_addr) != 1)
        fail("--host must be a numeric IPv4 address", 0);
    uint64_t start = now_ns();
    uint64_t deadline = start + (uint64_t)(options.connect_timeout * 1e9);
    uint64_t stall_ns = (uint64_t)(options.stall_timeout * 1e9);
    uint64_t last_progress = start;
    int greeted_before = 0;
    for (int first = 0; first < options.connections; first += CONNECT_BATCH) {
        int last = first + CONNECT_BATCH < options.connections ? first + CONNECT_BATCH : options.connections;
        for (int i = first; i < last; i++)
            open_connection(&connections[i], &address);
        while (greeted < last) {
            poll_events(50);
            uint64_t now = now_ns();
            if (current.errors > 0)
                fail("a connection failed or was closed while connecting (is the server up?)", 0);
            if (greeted > greeted_before) {
                greeted_before = greeted;
                last_progress = now;
            }
            if (now > deadline || now - last_progress > stall_ns) {
                char message[160];
                snprintf(message, sizeof message, "only %d of %d connections were answered (%s)", greeted,
                         options.connections, now > deadline ? "connect timeout" : "no progress: server stalled");
                fail(message, 0);
            }
        }
    }
    return (double)(now_ns() - start) / 1e9;
}

static void build_outgoing(void)
{
    char request[1024];
    const char *message;
    if (options.http_path) {
        snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n", options.http_path,
                 options.host, options.port);
        message = request;
        message_length = strlen(request);
    } else {
        message = NULL;
        message_length = options.size;
    }
    outgoing = malloc(message_length * (size_t)(options.depth + 1));
    for (int i = 0; i <= options.depth; i++) {
        char *copy = outgoing + (size_t)i * message_length;
        if (message)
            memcpy(copy, message, message_length);
        else
            for (size_t j = 0; j < message_length; j++)
                copy[j] = (char)('a' + j % 26);
    }
}

static void print_run(int run, double seconds)
{
    printf("{\"run\": %d, \"seconds\": %.6f, \"ops\": %llu, \"ops_per_s\": %.1f, \"bytes\": %llu, "
           "\"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, \"p999_us\": %.2f, \"max_us\": %.2f, "
           "\"errors\": %llu, \"connections\": %d}\n",
           run, seconds, (unsigned long long)current.operations, (double)current.operations / seconds,
           (unsigned long long)current.bytes, percentile_us(&current, 50), percentile_us(&current, 90),
           percentile_us(&current, 99), percentile_us(&current, 99.9), (double)current.max_latency / 1000.0,
           (unsigned long long)current.errors, alive);
    fflush(stdout);
}

static void hold_idle(double connect_seconds)
{
    printf("{\"idle_connections\": %d, \"connect_seconds\": %.3f}\n", alive, connect_seconds);
    fflush(stdout);
    struct pollfd input = {.fd = 0, .events = POLLIN};
    uint64_t deadline = now_ns() + (uint64_t)(options.duration * 1e9);
    char scratch[256];
    while (now_ns() < deadline) {
        if (poll(&input, 1, 100) > 0 && read(0, scratch, sizeof scratch) <= 0)
            break;   /* stdin closed: the caller has measured what it wanted */
    }
}

static void run_load(void)
{
    uint64_t now = now_ns();
    sending = 1;
    for (int i = 0; i < options.connections; i++) {
        struct connection *c = &connections[i];
        while (c->in_flight < options.depth)
            queue_message(c, now);
        flush_outgoing(c);
    }
    uint64_t boundary = now + (uint64_t)(options.warmup * 1e9);
    uint64_t run_start = now;
    int run = 0;   /* 0 = warm-up */
    for (;;) {
        now = now_ns();
        if (now >= boundary) {
            if (run > 0)
                print_run(run, (double)(now - run_start) / 1e9);
            else
                printf("{\"warmup_done\": true, \"seconds\": %.6f}\n", (double)(now - run_start) / 1e9);
            fflush(stdout);
            if (run == options.runs)
                return;
            run++;
            memset(&current, 0, sizeof current);
            recording = 1;
            run_start = now;
            boundary = now + (uint64_t)(options.duration * 1e9);
        }
        if (alive == 0) {
            print_run(run, (double)(now - run_start) / 1e9);
            fail("every connection was closed", 0);
        }
        uint64_t wait_ns = boundary - now;
        poll_events(wait_ns > 50000000u ? 50 : (int)(wait_ns / 1000000u) + 1);
    }
}

int main(int argc, char **argv)
{
    options = parse_options(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    alarm((unsigned)(options.connect_timeout + options.warmup + options.duration * (options.runs + 1) + 30));
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    connections = calloc((size_t)options.connections, sizeof *connections);
    receive_buffer = malloc(RECEIVE_BUFFER_SIZE);
    build_outgoing();
    double connect_seconds = connect_all();
    if (options.idle)
        hold_idle(connect_seconds);
    else
        run_load();
    return 0;
}
