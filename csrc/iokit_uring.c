/*
 * iokit_uring.c: the uring backend's hot path.
 *
 * Why it is in C: driven from Python, liburing costs several foreign calls per op (get an SQE, prep it, tag it) and
 * more per completion. Here the backend hands over a batch of op descriptors in one call and gets the completions
 * back as flat arrays in one call. Completions that are not an op's own never leave this file: the results of cancel
 * requests, of linked timeouts and of the wakeup poll are consumed here.
 *
 * user_data: an op's SQE carries the op's id (below 2^56). The SQEs this file adds on its own carry a tag in the top
 * byte (bit 63 set), so their CQEs can never be taken for an op's; a linked timeout carries its op's id, tagged.
 *
 * Kernel facts relied on:
 * - IORING_FEAT_NODROP (5.5): when the CQ is full the kernel keeps further CQEs aside instead of losing them and sets
 *   IORING_SQ_CQ_OVERFLOW; entering with GETEVENTS moves them into the CQ as it drains. Required.
 * - IORING_FEAT_EXT_ARG (5.11): io_uring_enter takes a timeout, so liburing needs no timeout SQE of its own (whose
 *   CQE our reap loop would otherwise meet). Required.
 * - A timeout's timespec is copied when the kernel consumes the SQE (IORING_FEAT_SUBMIT_STABLE).
 * - With SINGLE_ISSUER|DEFER_TASKRUN, completions are posted only when the ring's thread enters the kernel with
 *   GETEVENTS: every wait here does, even one that must not block.
 */
#define _GNU_SOURCE
#include "iokit_ring_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NSEC_PER_SEC 1000000000LL
#define NOT_SETTLED INT32_MIN
#define FIXED_FILE_SLOTS 256
#define SQPOLL_IDLE_MS 100

static void set_timespec(struct __kernel_timespec *ts, uint64_t ns)
{
	ts->tv_sec = (long long)(ns / NSEC_PER_SEC);
	ts->tv_nsec = (long long)(ns % NSEC_PER_SEC);
}

static int64_t monotonic_ns(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (int64_t)now.tv_sec * NSEC_PER_SEC + now.tv_nsec;
}

/*
 * The kernel copies a timeout's timespec when it consumes the SQE, and liburing hands an SQE slot out again only after
 * the kernel consumed it: one timespec per slot serves every timeout, with no allocation per op.
 */
static struct __kernel_timespec *slot_timespec(struct iokit_ring *r, const struct io_uring_sqe *sqe, uint64_t ns)
{
	struct __kernel_timespec *ts = &r->timespecs[sqe - r->ring.sq.sqes];

	set_timespec(ts, ns);
	return ts;
}

static int submit(struct iokit_ring *r)
{
	if (!io_uring_sq_ready(&r->ring))
		return 0;
	r->counters.enters++;
	return io_uring_submit(&r->ring);
}

/*
 * Make room for `count` SQEs, submitting what is queued if the SQ is full. -EBUSY: still no room (the kernel refused
 * the queued SQEs for now, or an SQPOLL thread has not consumed them yet); the caller tries again after a wait.
 * (Also the engine's: it prepares its own SQEs in the same SQ.)
 */
int iokit_ring_reserve(struct iokit_ring *r, unsigned count)
{
	int ret;

	if (io_uring_sq_space_left(&r->ring) >= count)
		return 0;
	ret = submit(r);
	if (ret < 0)
		return ret;
	return io_uring_sq_space_left(&r->ring) >= count ? 0 : -EBUSY;
}

static int arm_wakeup(struct iokit_ring *r)
{
	struct io_uring_sqe *sqe;
	int ret = iokit_ring_reserve(r, 1);

	if (ret < 0)
		return ret;
	sqe = io_uring_get_sqe(&r->ring);
	if (r->wake_multishot)
		io_uring_prep_poll_multishot(sqe, r->wake_fd, POLLIN);
	else
		io_uring_prep_poll_add(sqe, r->wake_fd, POLLIN);
	io_uring_sqe_set_data64(sqe, UD_WAKE);
	r->counters.sqes++;
	return 0;
}

/* Prepare one op's SQE, and its linked timeout if it has a deadline. The caller reserved the room. */
static void prep_op(struct iokit_ring *r, const struct iokit_op *op)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
	/* -1 becomes (u64)-1, io_uring's "at the file position" (IORING_FEAT_RW_CUR_POS). */
	uint64_t offset = (uint64_t)op->offset;
	uint64_t user_data = op->id;

	switch (op->kind) {
	case IOKIT_NOP:
		io_uring_prep_nop(sqe);
		break;
	case IOKIT_READ:
		io_uring_prep_read(sqe, op->fd, op->addr, op->len, offset);
		break;
	case IOKIT_WRITE:
		io_uring_prep_write(sqe, op->fd, op->addr, op->len, offset);
		break;
	case IOKIT_READV:
		io_uring_prep_readv(sqe, op->fd, op->addr, op->len, offset);
		break;
	case IOKIT_WRITEV:
		io_uring_prep_writev(sqe, op->fd, op->addr, op->len, offset);
		break;
	case IOKIT_FSYNC:
		io_uring_prep_fsync(sqe, op->fd, 0);
		break;
	case IOKIT_FDATASYNC:
		io_uring_prep_fsync(sqe, op->fd, IORING_FSYNC_DATASYNC);
		break;
	case IOKIT_OPEN:
		io_uring_prep_openat(sqe, AT_FDCWD, op->addr, (int)op->flags, op->mode);
		break;
	case IOKIT_CLOSE:
		io_uring_prep_close(sqe, op->fd);
		break;
	case IOKIT_ACCEPT:
		io_uring_prep_accept(sqe, op->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		break;
	case IOKIT_ACCEPT_MULTISHOT:
		io_uring_prep_multishot_accept(sqe, op->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		break;
	case IOKIT_CONNECT:
		io_uring_prep_connect(sqe, op->fd, op->addr, op->len);
		break;
	case IOKIT_RECV:
		io_uring_prep_recv(sqe, op->fd, op->addr, op->len, (int)op->flags);
		break;
	case IOKIT_RECV_MULTISHOT:
		io_uring_prep_recv_multishot(sqe, op->fd, NULL, 0, (int)op->flags);
		sqe->flags |= IOSQE_BUFFER_SELECT;
		sqe->buf_group = RECV_BUFFER_GROUP;
		break;
	case IOKIT_RECV_SELECT:
		/* No buffer is tied up while the socket is idle: the kernel picks one when data arrives. */
		io_uring_prep_recv(sqe, op->fd, NULL, op->len, (int)op->flags);
		sqe->flags |= IOSQE_BUFFER_SELECT;
		sqe->buf_group = RECV_BUFFER_GROUP;
		break;
	case IOKIT_SEND:
		io_uring_prep_send(sqe, op->fd, op->addr, op->len, (int)op->flags | MSG_NOSIGNAL);
		break;
	case IOKIT_SHUTDOWN:
		io_uring_prep_shutdown(sqe, op->fd, (int)op->flags);
		break;
	case IOKIT_TIMEOUT:
		io_uring_prep_timeout(sqe, slot_timespec(r, sqe, op->timeout_ns), 0, 0);
		break;
	case IOKIT_POLL:
		io_uring_prep_poll_add(sqe, op->fd, op->flags);
		break;
	case IOKIT_CANCEL:
		io_uring_prep_cancel64(sqe, op->id, 0);
		user_data = UD_CANCEL | op->id;
		break;
	}
	io_uring_sqe_set_data64(sqe, user_data);
	if (op->fixed_file)
		sqe->flags |= IOSQE_FIXED_FILE;
	r->counters.sqes++;

	if (op->deadline_ns) {
		struct io_uring_sqe *timer = io_uring_get_sqe(&r->ring);

		/* Absolute CLOCK_MONOTONIC time, the clock of Python's time.monotonic(): no drift between the caller's
		 * clock reading and the submit. */
		sqe->flags |= IOSQE_IO_LINK;
		io_uring_prep_link_timeout(timer, slot_timespec(r, timer, op->deadline_ns), IORING_TIMEOUT_ABS);
		io_uring_sqe_set_data64(timer, UD_LINK_TIMEOUT | op->id);
		r->counters.sqes++;
	}
}

static int prepare(struct iokit_ring *r, const struct iokit_op *ops, unsigned count)
{
	unsigned i;

	/* Check the whole batch first, so that a bad descriptor leaves no half-prepared batch behind. */
	for (i = 0; i < count; i++)
		if (ops[i].kind >= IOKIT_KIND_COUNT || ops[i].id > IOKIT_MAX_ID || ops[i].kind == IOKIT_READ_BATCH ||
		    ops[i].kind == IOKIT_WRITE_BATCH)
			return -EINVAL;
	for (i = 0; i < count; i++) {
		/* An op and its linked timeout must be adjacent in the SQ: reserve both slots at once. */
		int ret = iokit_ring_reserve(r, ops[i].deadline_ns ? 2 : 1);

		if (ret < 0) {
			if (i == 0 && ret != -EBUSY && ret != -EAGAIN)
				return ret;
			break;
		}
		prep_op(r, &ops[i]);
	}
	return (int)i;
}

int iokit_ring_queue_ops(struct iokit_ring *r, const struct iokit_op *ops, unsigned count)
{
	return prepare(r, ops, count);
}

int iokit_ring_submit_ops(struct iokit_ring *r, const struct iokit_op *ops, unsigned count)
{
	int prepared = prepare(r, ops, count);

	/* If this submit fails the SQEs stay queued: the next wait submits them again and reports a lasting error. */
	if (prepared > 0)
		submit(r);
	return prepared;
}

/*
 * Batches: one SQE per block, one record per batch. A block's user_data is UD_BATCH | the address of its slot in
 * self[], which points back at the record, so the reap finds the record and the block's index with no lookup. The
 * record is freed only when every block has settled (its CQE reaped, or cancelled before it reached the SQ): no CQE
 * can name a freed record. The kernel may write a block's buffer until that block's CQE; Python holds the buffers,
 * the offsets and the results array until the batch's completion, which comes after the last block's.
 */
struct batch_record {
	struct iokit_batch batch; /* a copy: its pointers stay valid (held by Python) until the completion */
	uint32_t prepared;        /* blocks whose SQE is in the SQ (the first `prepared`) */
	uint32_t limit;           /* blocks to prepare at all: count, or `prepared` once cancelled */
	uint32_t pending;         /* blocks not settled yet */
	uint32_t cancels_sent;    /* blocks [0, cancels_sent) have had their ASYNC_CANCEL queued */
	struct batch_record *self[];
};

int32_t iokit_batch_outcome(const int32_t *results, uint32_t count)
{
	int32_t first_error = 0;
	uint32_t i;

	for (i = 0; i < count; i++) {
		if (results[i] == -ECANCELED)
			return -ECANCELED;
		if (results[i] < 0 && !first_error)
			first_error = results[i];
	}
	return first_error ? first_error : (int32_t)count;
}

static uint64_t block_user_data(struct batch_record *b, uint32_t i)
{
	return UD_BATCH | (uint64_t)(uintptr_t)&b->self[i];
}

/* Prepare blocks from b->prepared on, while the SQ has room (iokit_ring_reserve submits a full SQ first). */
static void prepare_blocks(struct iokit_ring *r, struct batch_record *b)
{
	const struct iokit_batch *batch = &b->batch;

	while (b->prepared < b->limit) {
		uint32_t i = b->prepared;
		struct io_uring_sqe *sqe;
		void *address;
		unsigned len;

		if (iokit_ring_reserve(r, 1) < 0)
			return;
		sqe = io_uring_get_sqe(&r->ring);
		if (batch->base) {
			address = batch->base + (size_t)i * batch->block_size;
			len = batch->block_size;
		} else {
			address = batch->blocks[i].iov_base;
			len = (unsigned)batch->blocks[i].iov_len;
		}
		if (batch->write)
			io_uring_prep_write(sqe, batch->fd, address, len, (uint64_t)batch->offsets[i]);
		else
			io_uring_prep_read(sqe, batch->fd, address, len, (uint64_t)batch->offsets[i]);
		io_uring_sqe_set_data64(sqe, block_user_data(b, i));
		if (batch->fixed_file)
			sqe->flags |= IOSQE_FIXED_FILE;
		r->counters.sqes++;
		b->prepared++;
	}
}

int iokit_ring_submit_batch(struct iokit_ring *r, const struct iokit_batch *batch, int submit_now,
			    void **handle_out)
{
	struct batch_record *b;
	uint32_t i;

	if (batch->count == 0 || batch->id > IOKIT_MAX_ID || !batch->offsets || !batch->results ||
	    (!batch->base && !batch->blocks))
		return -EINVAL;
	b = malloc(sizeof *b + (size_t)batch->count * sizeof b->self[0]);
	if (!b)
		return -ENOMEM;
	/* user_data has 56 bits for the slot's address: user space addresses on Linux have at most 48 (57 with 5-level
	 * paging, which the kernel hands out only to a process that asks for addresses that high). */
	if ((uintptr_t)&b->self[batch->count] > IOKIT_MAX_ID) {
		free(b);
		return -ENOMEM;
	}
	b->batch = *batch;
	b->prepared = 0;
	b->limit = batch->count;
	b->pending = batch->count;
	b->cancels_sent = 0;
	for (i = 0; i < batch->count; i++) {
		b->self[i] = b;
		batch->results[i] = NOT_SETTLED;
	}
	prepare_blocks(r, b);
	if (b->prepared && submit_now)
		submit(r);
	*handle_out = b;
	return (int)b->prepared;
}

int iokit_ring_continue_batch(struct iokit_ring *r, void *handle)
{
	struct batch_record *b = handle;

	prepare_blocks(r, b);
	return (int)(b->limit - b->prepared);
}

int iokit_ring_cancel_batch(struct iokit_ring *r, void *handle, int32_t *outcome)
{
	struct batch_record *b = handle;
	uint32_t i;

	/* Blocks the kernel never saw settle now. */
	for (i = b->prepared; i < b->limit; i++)
		b->batch.results[i] = -ECANCELED;
	b->pending -= b->limit - b->prepared;
	b->limit = b->prepared;
	if (b->pending == 0) {
		*outcome = iokit_batch_outcome(b->batch.results, b->batch.count);
		free(b);
		return 1;
	}
	/* The kernel has the others: ask it to cancel each one that has not completed. Each still gets its one CQE, with
	 * -ECANCELED or its real result; the cancel's own CQE is consumed in internal_completion (UD_CANCEL). */
	for (i = b->cancels_sent; i < b->prepared; i++, b->cancels_sent++) {
		struct io_uring_sqe *sqe;

		if (b->batch.results[i] != NOT_SETTLED)
			continue;
		if (iokit_ring_reserve(r, 1) < 0)
			return -EBUSY;
		sqe = io_uring_get_sqe(&r->ring);
		io_uring_prep_cancel64(sqe, block_user_data(b, i), 0);
		io_uring_sqe_set_data64(sqe, UD_CANCEL | b->batch.id);
		r->counters.sqes++;
	}
	return 0;
}

/* A block's CQE: record its result; true (with the batch's id and outcome) when it was the batch's last block. */
static bool batch_block_completion(const struct io_uring_cqe *cqe, uint64_t *id, int32_t *outcome)
{
	struct batch_record **slot = (struct batch_record **)(uintptr_t)(cqe->user_data & IOKIT_MAX_ID);
	struct batch_record *b = *slot;

	b->batch.results[slot - b->self] = cqe->res;
	if (--b->pending)
		return false;
	*id = b->batch.id;
	*outcome = iokit_batch_outcome(b->batch.results, b->batch.count);
	free(b);
	return true;
}

int32_t iokit_file_batch(int fd, int write, char *base, uint32_t block_size, const struct iovec *blocks,
			 const int64_t *offsets, int32_t *results, uint32_t count, const volatile int32_t *stop)
{
	uint32_t i;

	for (i = 0; i < count; i++) {
		void *address = base ? base + (size_t)i * block_size : blocks[i].iov_base;
		size_t len = base ? block_size : blocks[i].iov_len;
		ssize_t done;

		if (stop && *stop) {
			for (; i < count; i++)
				results[i] = -ECANCELED;
			break;
		}
		do
			done = write ? pwrite(fd, address, len, (off_t)offsets[i]) : pread(fd, address, len, (off_t)offsets[i]);
		while (done < 0 && errno == EINTR);
		results[i] = done < 0 ? -errno : (int32_t)done;
	}
	return iokit_batch_outcome(results, count);
}

/* Give the provided buffers the caller has copied out back to the kernel. */
static void recycle_buffers(struct iokit_ring *r)
{
	int mask = io_uring_buf_ring_mask(r->buffer_count);
	unsigned i;

	if (!r->lent_count)
		return;
	for (i = 0; i < r->lent_count; i++) {
		uint16_t id = r->lent[i];

		io_uring_buf_ring_add(r->buf_ring, r->buffers + (size_t)id * r->buffer_size, r->buffer_size, id, mask,
				      (int)i);
	}
	io_uring_buf_ring_advance(r->buf_ring, (int)r->lent_count);
	r->lent_count = 0;
}

/*
 * Buffers are given to the kernel BUFFERS_ADDED_AT_ONCE at a time: at the start, and again before a wait each time a
 * recv found none left (-ENOBUFS ends a multishot recv: with too few buffers, the connections re-armed last keep
 * finding none while the others take every buffer returned, and wait seconds). The kernel cycles through every
 * buffer in the ring, so each one added is memory touched for good: an idle server keeps 2 MiB, a loaded one what
 * its load needed, up to the capacity.
 */
#define BUFFERS_ADDED_AT_ONCE 128

static void add_buffers(struct iokit_ring *r)
{
	unsigned first = r->buffers_in_ring, count = r->buffer_count - first;

	if (count > BUFFERS_ADDED_AT_ONCE)
		count = BUFFERS_ADDED_AT_ONCE;
	for (unsigned i = 0; i < count; i++)
		r->lent[r->lent_count++] = (uint16_t)(first + i);
	r->buffers_in_ring += count;
	recycle_buffers(r);
}

static void internal_completion(struct iokit_ring *r, const struct io_uring_cqe *cqe)
{
	eventfd_t ignored;

	if (UD_TAG(cqe->user_data) == UD_ENGINE) {
		/* Only while an engine is attached are such SQEs made, and only the engine reaps then. */
		if (r->engine_completion)
			r->engine_completion(r->engine, cqe);
		return;
	}
	/* Cancel results and linked timeouts need nothing: the op they concern completes through its own CQE. */
	if (UD_TAG(cqe->user_data) != UD_WAKE)
		return;
	r->woken = true;
	/* Reset the counter so that the next write makes the fd readable again (EAGAIN: it already is 0). */
	(void)eventfd_read(r->wake_fd, &ignored);
	if (cqe->flags & IORING_CQE_F_MORE)
		return;
	if (cqe->res == -EINVAL)
		r->wake_multishot = false;
	r->wake_armed = arm_wakeup(r) == 0;
}

/* Move up to `max` op completions from the CQ (and from the kernel's overflow list) into the arrays; the engine's
 * own completions go to the engine as they are met, in order. */
unsigned iokit_ring_reap(struct iokit_ring *r, uint64_t *ids, int32_t *results, uint32_t *cqe_flags, unsigned max)
{
	unsigned reaped = 0;

	for (;;) {
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;

		io_uring_for_each_cqe(&r->ring, head, cqe) {
			if (reaped == max)
				break;
			seen++;
			if (cqe->res == -ENOBUFS)
				r->buffers_short = true;
			if (UD_TAG(cqe->user_data) == UD_BATCH) {
				/* A block of a batch: the batch completes, as one op, with its last block. */
				if (batch_block_completion(cqe, &ids[reaped], &results[reaped])) {
					cqe_flags[reaped] = 0;
					reaped++;
				}
				continue;
			}
			if (cqe->user_data & (1ULL << 63)) {
				internal_completion(r, cqe);
				continue;
			}
			if (cqe->flags & IORING_CQE_F_BUFFER)
				r->lent[r->lent_count++] = (uint16_t)(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
			ids[reaped] = cqe->user_data;
			results[reaped] = cqe->res;
			cqe_flags[reaped] = cqe->flags;
			reaped++;
		}
		io_uring_cq_advance(&r->ring, seen);
		r->counters.cqes += seen;
		if (reaped == max || !io_uring_cq_has_overflow(&r->ring))
			return reaped;
		/* CQEs that did not fit wait in the kernel (IORING_FEAT_NODROP): the CQ has room now, go and get them. */
		r->counters.overflow_flushes++;
		r->counters.enters++;
		if (io_uring_get_events(&r->ring) < 0)
			return reaped;
	}
}

/* One io_uring_enter: submit what is queued, collect completions (GETEVENTS) and block only if the CQ is empty. */
#define FOREVER_SLICE_NS (60LL * 1000 * 1000 * 1000)

int iokit_ring_enter(struct iokit_ring *r, int64_t timeout_ns)
{
	struct io_uring_cqe *cqe;
	struct __kernel_timespec ts;

	r->counters.enters++;
	if (timeout_ns == 0 || io_uring_cq_ready(&r->ring))
		return io_uring_submit_and_get_events(&r->ring);
	/* Always with a timeout: without one, liburing 2.3 re-enters by itself when a signal cuts short a wait that
	 * also submitted (the kernel then answers with the count submitted, not -EINTR), so the signal would never
	 * reach Python. With one it returns, and so do we (see iokit_ring_wait). Python waits again after a timeout. */
	if (timeout_ns < 0)
		timeout_ns = FOREVER_SLICE_NS;
	set_timespec(&ts, (uint64_t)timeout_ns);
	return io_uring_submit_and_wait_timeout(&r->ring, &cqe, 1, &ts, NULL);
}

void iokit_ring_before_wait(struct iokit_ring *r)
{
	recycle_buffers(r);
	if (r->buffers_short && r->buffers_in_ring < r->buffer_count)
		add_buffers(r);
	r->buffers_short = false;
	if (!r->wake_armed)
		r->wake_armed = arm_wakeup(r) == 0;
	r->woken = false;
}

void iokit_ring_return_buffer(struct iokit_ring *r, unsigned buffer_id)
{
	io_uring_buf_ring_add(r->buf_ring, r->buffers + (size_t)buffer_id * r->buffer_size, r->buffer_size,
			      (unsigned short)buffer_id, io_uring_buf_ring_mask(r->buffer_count), 0);
	io_uring_buf_ring_advance(r->buf_ring, 1);
}

int iokit_ring_wait(struct iokit_ring *r, int64_t timeout_ns, uint64_t *ids, int32_t *results,
		    uint32_t *cqe_flags, unsigned max)
{
	int64_t deadline = timeout_ns > 0 ? monotonic_ns() + timeout_ns : 0;

	iokit_ring_before_wait(r);
	for (;;) {
		int ret = iokit_ring_enter(r, timeout_ns);
		unsigned reaped;

		/* -EINTR goes back to Python, which runs its signal handlers and calls again with the time left. -EBUSY:
		 * the kernel holds overflowed CQEs it could not flush; reaping makes room. */
		if (ret < 0 && ret != -ETIME && ret != -EBUSY && ret != -EAGAIN)
			return ret;
		reaped = iokit_ring_reap(r, ids, results, cqe_flags, max);
		/* A CQE of our own alone (a cancel result) is no reason to return while time is left. But an enter that
		 * submitted SQEs reports their count, not -EINTR, when a signal cuts its wait short: go back to Python then
		 * too (it runs its handlers and calls again), or an idle server would never see its SIGTERM. */
		if (reaped || r->woken || timeout_ns == 0 || ret == -ETIME || ret > 0)
			return (int)reaped;
		if (deadline) {
			timeout_ns = deadline - monotonic_ns();
			if (timeout_ns <= 0)
				return 0;
		}
	}
}

static void free_buffer_ring(struct iokit_ring *r)
{
	if (r->buffers)
		munmap(r->buffers, (size_t)r->buffer_count * r->buffer_size);
	if (r->buf_ring)
		munmap(r->buf_ring, r->buf_ring_bytes);
	free(r->lent);
	r->buffers = NULL;
	r->buf_ring = NULL;
	r->lent = NULL;
	r->buffer_count = 0;
	r->buffers_in_ring = 0;
}

/*
 * liburing 2.3 lacks io_uring_setup_buf_ring() (2.4): map the shared ring ourselves (mmap gives the page alignment
 * the kernel requires) and register it. Buffers are mapped, not malloc'ed, so untouched ones cost no memory.
 */
static int setup_buffer_ring(struct iokit_ring *r, unsigned count, unsigned size)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	struct io_uring_buf_reg reg;
	void *memory;
	int ret;

	if (count == 0 || count > 32768 || (count & (count - 1)) || size == 0)
		return -EINVAL;
	r->buf_ring_bytes = (count * sizeof(struct io_uring_buf) + page - 1) & ~(page - 1);
	memory = mmap(NULL, r->buf_ring_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (memory == MAP_FAILED)
		return -errno;
	r->buf_ring = memory;
	r->buffer_count = count;
	r->buffer_size = size;
	memory = mmap(NULL, (size_t)count * size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (memory == MAP_FAILED) {
		ret = -errno;
		goto fail;
	}
	r->buffers = memory;
	r->lent = calloc(count, sizeof *r->lent);
	if (!r->lent) {
		ret = -ENOMEM;
		goto fail;
	}
	memset(&reg, 0, sizeof reg);
	reg.ring_addr = (uint64_t)(uintptr_t)r->buf_ring;
	reg.ring_entries = count;
	reg.bgid = RECV_BUFFER_GROUP;
	ret = io_uring_register_buf_ring(&r->ring, &reg, 0);
	if (ret < 0)
		goto fail;
	io_uring_buf_ring_init(r->buf_ring);
	r->lent_count = 0;
	r->buffers_in_ring = 0;
	add_buffers(r);
	return 0;
fail:
	free_buffer_ring(r);
	return ret;
}

/*
 * Multishot accept (5.19) and recv (6.0) are flags of an SQE. A kernel that does not know a flag fails the SQE with
 * -EINVAL when preparing it; one that knows it gets as far as the fd, here our eventfd, which is no socket: -ENOTSOCK.
 */
static uint32_t probe_multishot(struct iokit_ring *r, uint32_t candidates)
{
	struct io_uring_cqe *cqe;
	struct io_uring_sqe *sqe;
	unsigned wanted = 0, seen;
	uint32_t found = 0;

	if (candidates & IOKIT_FEATURE_MULTISHOT_ACCEPT) {
		sqe = io_uring_get_sqe(&r->ring);
		io_uring_prep_multishot_accept(sqe, r->wake_fd, NULL, NULL, 0);
		io_uring_sqe_set_data64(sqe, UD_PROBE | IOKIT_FEATURE_MULTISHOT_ACCEPT);
		wanted++;
	}
	if (candidates & IOKIT_FEATURE_MULTISHOT_RECV) {
		sqe = io_uring_get_sqe(&r->ring);
		io_uring_prep_recv_multishot(sqe, r->wake_fd, NULL, 0, 0);
		sqe->flags |= IOSQE_BUFFER_SELECT;
		sqe->buf_group = RECV_BUFFER_GROUP;
		io_uring_sqe_set_data64(sqe, UD_PROBE | IOKIT_FEATURE_MULTISHOT_RECV);
		wanted++;
	}
	if (!wanted)
		return 0;
	r->counters.sqes += wanted;
	r->counters.enters++;
	if (io_uring_submit_and_wait(&r->ring, wanted) < 0)
		return 0;
	for (seen = 0; seen < wanted && io_uring_peek_cqe(&r->ring, &cqe) == 0; seen++) {
		if (cqe->res != -EINVAL)
			found |= (uint32_t)(cqe->user_data & IOKIT_MAX_ID);
		io_uring_cqe_seen(&r->ring, cqe);
	}
	r->counters.cqes += seen;
	return found;
}

/* io_uring_setup with the best flags this kernel accepts: each later attempt drops what an older kernel refuses. */
static int setup_ring(struct iokit_ring *r, const struct iokit_ring_params *params)
{
	const unsigned base = IORING_SETUP_CLAMP | IORING_SETUP_SUBMIT_ALL;
	unsigned attempts[3], count = 0, i;
	struct io_uring_params p;
	int ret = -EINVAL;

	if (params->features & IOKIT_FEATURE_SQPOLL)
		attempts[count++] = base | IORING_SETUP_SQPOLL;
	else if (params->features & IOKIT_FEATURE_DEFER_TASKRUN)
		attempts[count++] = base | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
	attempts[count++] = base;
	attempts[count++] = IORING_SETUP_CLAMP; /* before 5.18: no SUBMIT_ALL */
	for (i = 0; i < count; i++) {
		memset(&p, 0, sizeof p);
		p.flags = attempts[i];
		if (params->cq_entries) {
			p.flags |= IORING_SETUP_CQSIZE;
			p.cq_entries = params->cq_entries;
		}
		if (p.flags & IORING_SETUP_SQPOLL)
			p.sq_thread_idle = SQPOLL_IDLE_MS;
		ret = io_uring_queue_init_params(params->entries, &r->ring, &p);
		if (ret == 0)
			break;
		/* ENOSYS, EPERM, ENOMEM... would fail every attempt: report them. A refused SQPOLL falls back. */
		if (ret != -EINVAL && !(p.flags & IORING_SETUP_SQPOLL))
			return ret;
	}
	if (ret < 0)
		return ret;
	if (!(p.features & IORING_FEAT_NODROP) || !(p.features & IORING_FEAT_EXT_ARG)) {
		io_uring_queue_exit(&r->ring);
		return -EOPNOTSUPP;
	}
	r->features = IOKIT_FEATURE_NODROP | IOKIT_FEATURE_EXT_ARG;
	if (p.features & IORING_FEAT_FAST_POLL)
		r->features |= IOKIT_FEATURE_FAST_POLL;
	if (p.flags & IORING_SETUP_DEFER_TASKRUN)
		r->features |= IOKIT_FEATURE_DEFER_TASKRUN;
	if (p.flags & IORING_SETUP_SQPOLL)
		r->features |= IOKIT_FEATURE_SQPOLL;
	return 0;
}

/* Everything after io_uring_setup: each optional feature is tried and left out if the kernel refuses it. */
static int setup_features(struct iokit_ring *r, const struct iokit_ring_params *params)
{
	uint32_t allowed = params->features;
	struct io_uring_probe *probe;

	r->timespecs = calloc(r->ring.sq.ring_entries, sizeof *r->timespecs);
	if (!r->timespecs)
		return -ENOMEM;
	r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (r->wake_fd < 0)
		return -errno;

	probe = io_uring_get_probe_ring(&r->ring);
	if (probe) {
		if ((allowed & IOKIT_FEATURE_LINKED_TIMEOUTS) && io_uring_opcode_supported(probe, IORING_OP_LINK_TIMEOUT))
			r->features |= IOKIT_FEATURE_LINKED_TIMEOUTS;
		io_uring_free_probe(probe);
	}
	if ((allowed & IOKIT_FEATURE_REGISTERED_FILES) && io_uring_register_files_sparse(&r->ring, FIXED_FILE_SLOTS) == 0) {
		r->fixed_file_slots = FIXED_FILE_SLOTS;
		r->features |= IOKIT_FEATURE_REGISTERED_FILES;
	}
	if ((allowed & IOKIT_FEATURE_BUFFER_RING) &&
	    setup_buffer_ring(r, params->recv_buffer_count, params->recv_buffer_size) == 0)
		r->features |= IOKIT_FEATURE_BUFFER_RING;
	if (!(r->features & IOKIT_FEATURE_BUFFER_RING))
		allowed &= ~(uint32_t)IOKIT_FEATURE_MULTISHOT_RECV;
	r->features |= probe_multishot(r, allowed & (IOKIT_FEATURE_MULTISHOT_ACCEPT | IOKIT_FEATURE_MULTISHOT_RECV));

	r->wake_multishot = true;
	r->wake_armed = arm_wakeup(r) == 0;
	return submit(r) < 0 ? -EIO : 0;
}

int iokit_ring_open(struct iokit_ring **ring_out, struct iokit_ring_params *params)
{
	struct iokit_ring *r;
	int ret;

	/* An op with a deadline takes two adjacent SQEs. */
	if (params->entries < 2)
		return -EINVAL;
	r = calloc(1, sizeof *r);
	if (!r)
		return -ENOMEM;
	r->wake_fd = -1;
	ret = setup_ring(r, params);
	if (ret < 0) {
		free(r);
		return ret;
	}
	ret = setup_features(r, params);
	if (ret < 0) {
		iokit_ring_close(r);
		return ret;
	}
	params->features = r->features;
	*ring_out = r;
	return 0;
}

/* The caller has drained every op first: nothing in the kernel still uses a buffer when the memory goes. */
void iokit_ring_close(struct iokit_ring *r)
{
	io_uring_queue_exit(&r->ring);
	free_buffer_ring(r);
	if (r->wake_fd >= 0)
		close(r->wake_fd);
	free(r->timespecs);
	free(r);
}

int iokit_ring_wakeup_fd(const struct iokit_ring *r)
{
	return r->wake_fd;
}

int iokit_ring_set_fixed_file(struct iokit_ring *r, unsigned slot, int fd)
{
	int ret;

	if (slot >= r->fixed_file_slots)
		return -EINVAL;
	r->counters.registers++;
	ret = io_uring_register_files_update(&r->ring, slot, &fd, 1);
	return ret < 0 ? ret : 0;
}

unsigned iokit_ring_fixed_file_slots(const struct iokit_ring *r)
{
	return r->fixed_file_slots;
}

char *iokit_ring_recv_buffer(const struct iokit_ring *r, unsigned buffer_id)
{
	if (!r->buffers || buffer_id >= r->buffer_count)
		return NULL;
	return r->buffers + (size_t)buffer_id * r->buffer_size;
}

void iokit_ring_counters(const struct iokit_ring *r, struct iokit_counters *out)
{
	*out = r->counters;
	out->cq_dropped = *r->ring.cq.koverflow;
}

int iokit_socket_family(int fd)
{
	int family;
	socklen_t size = sizeof family;

	if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &family, &size) < 0)
		return -errno;
	return family;
}
