/*
 * iokit_uring.h: the small C API the uring backend (iokit/backends/uring.py) calls through cffi.
 *
 * Python never sees liburing's structures: the ring is opaque, ops travel as arrays of `struct iokit_op` (one C call
 * prepares and submits a whole batch) and completions come back as flat arrays (one C call waits and reaps). Functions
 * that can fail return -errno, like liburing.
 */
#ifndef IOKIT_URING_H
#define IOKIT_URING_H

#include <stdint.h>
#include <sys/uio.h>

/* Op kinds. 0..17 are iokit._kinds.OpKind's values; the others exist only between the backend and this file.
 * iokit/backends/uring.py checks every value, and IOKIT_KIND_COUNT, against its own when it loads. */
enum {
	IOKIT_NOP = 0,
	IOKIT_READ = 1,
	IOKIT_WRITE = 2,
	IOKIT_READV = 3,
	IOKIT_WRITEV = 4,
	IOKIT_FSYNC = 5,
	IOKIT_FDATASYNC = 6,
	IOKIT_OPEN = 7,
	IOKIT_CLOSE = 8,
	IOKIT_ACCEPT = 9,
	IOKIT_CONNECT = 10,
	IOKIT_RECV = 11,
	IOKIT_SEND = 12,
	IOKIT_SHUTDOWN = 13,
	IOKIT_TIMEOUT = 14,
	IOKIT_POLL = 15,
	IOKIT_READ_BATCH = 16,       /* N blocks, an SQE each: never a struct iokit_op, see iokit_ring_submit_batch() */
	IOKIT_WRITE_BATCH = 17,
	IOKIT_ACCEPT_MULTISHOT = 18, /* one request, a CQE per connection */
	IOKIT_RECV_MULTISHOT = 19,   /* one request, a CQE per chunk, in a buffer of the provided buffer ring */
	IOKIT_CANCEL = 20,           /* ask the kernel to cancel the op whose id is `id` */
	IOKIT_RECV_SELECT = 21,      /* one recv into a buffer the kernel takes from the provided buffer ring */
	IOKIT_KIND_COUNT             /* one past the last kind: prepare() refuses a kind from here on */
};

/* Op ids are below 2^56: the top byte of user_data tags the SQEs this file adds on its own. */
#define IOKIT_MAX_ID ((1ULL << 56) - 1)

/* Features, as bits: asked for in iokit_ring_params.features, reported there as found and in use. */
#define IOKIT_FEATURE_DEFER_TASKRUN 1    /* IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN */
#define IOKIT_FEATURE_SQPOLL 2           /* a kernel thread polls the SQ (never on unless asked) */
#define IOKIT_FEATURE_LINKED_TIMEOUTS 4  /* IORING_OP_LINK_TIMEOUT, for per-op deadlines */
#define IOKIT_FEATURE_REGISTERED_FILES 8 /* a sparse fixed-file table */
#define IOKIT_FEATURE_MULTISHOT_ACCEPT 16
#define IOKIT_FEATURE_MULTISHOT_RECV 32  /* needs IOKIT_FEATURE_BUFFER_RING */
#define IOKIT_FEATURE_BUFFER_RING 64     /* a registered provided-buffer ring */
#define IOKIT_FEATURE_NODROP 128         /* read-only facts about the kernel from here on */
#define IOKIT_FEATURE_EXT_ARG 256
#define IOKIT_FEATURE_FAST_POLL 512

/* One op, as the backend describes it. Each kind reads only the fields it needs (id, kind, fd, fixed_file and
 * deadline_ns always); the others may hold anything. What `addr` points to stays alive (Python holds it) until the
 * op's final completion. */
struct iokit_op {
	uint64_t id;           /* the op's id, returned with each of its completions */
	void *addr;            /* buffer, iovec array, NUL-terminated path or sockaddr; NULL if none */
	int64_t offset;        /* file offset; -1: at the file position */
	uint64_t timeout_ns;   /* IOKIT_TIMEOUT: how long */
	uint64_t deadline_ns;  /* CLOCK_MONOTONIC time at which a linked timeout cancels the op; 0: none */
	uint32_t len;          /* bytes, iovec count or sockaddr length */
	uint32_t flags;        /* recv/send flags, open flags, poll events or shutdown's `how` */
	uint32_t mode;         /* open mode */
	int32_t fd;            /* fd, or the fixed-file slot when fixed_file is set */
	uint8_t kind;          /* IOKIT_* above */
	uint8_t fixed_file;    /* fd is a slot of the registered file table */
};

struct iokit_ring_params {
	unsigned entries;            /* SQ size (the kernel rounds it up to a power of two) */
	unsigned cq_entries;         /* CQ size; 0: twice the SQ */
	uint32_t features;           /* in: the IOKIT_FEATURE_* allowed; out: the ones in use, plus the kernel's facts */
	unsigned recv_buffer_count;  /* provided buffers for multishot recv (a power of two) */
	unsigned recv_buffer_size;
};

struct iokit_counters {
	uint64_t enters;          /* io_uring_enter calls (an upper bound under SQPOLL, where a submit may not enter) */
	uint64_t registers;       /* io_uring_register calls after setup */
	uint64_t sqes;            /* SQEs prepared, ours included (linked timeouts, cancels, the wakeup poll) */
	uint64_t cqes;            /* CQEs reaped, ours included */
	uint64_t overflow_flushes; /* times the kernel held CQEs that did not fit in the CQ and we went back for them */
	uint64_t cq_dropped;      /* CQEs the kernel lost (stays 0 with IORING_FEAT_NODROP) */
};

struct iokit_ring;

int iokit_ring_open(struct iokit_ring **ring_out, struct iokit_ring_params *params);
void iokit_ring_close(struct iokit_ring *ring);

/* Prepare ops[0..count) and submit them. Returns how many were prepared: all of them, unless the kernel would not take
 * queued SQEs to make room (-EBUSY/-EAGAIN); the caller offers the rest again later. */
int iokit_ring_submit_ops(struct iokit_ring *ring, const struct iokit_op *ops, unsigned count);
/* The same without the final submit: the SQEs go in with the next submit or wait (cancels, re-armed multishots). */
int iokit_ring_queue_ops(struct iokit_ring *ring, const struct iokit_op *ops, unsigned count);

/* Submit what is queued, wait up to timeout_ns (-1: no limit, 0: do not block) for completions, and reap up to `max`
 * of them into ids/results/cqe_flags. Returns how many were reaped: 0 after the timeout or a wakeup. -EINTR: a signal
 * came; call again with the time left. A provided buffer named in cqe_flags belongs to the caller until its next call
 * into the ring. */
int iokit_ring_wait(struct iokit_ring *ring, int64_t timeout_ns, uint64_t *ids, int32_t *results,
		    uint32_t *cqe_flags, unsigned max);

/* The eventfd that wakes a waiting iokit_ring_wait(): any thread may write to it. */
int iokit_ring_wakeup_fd(const struct iokit_ring *ring);
/* Point fixed-file slot `slot` at `fd` (-1 empties it). */
int iokit_ring_set_fixed_file(struct iokit_ring *ring, unsigned slot, int fd);
/* Number of fixed-file slots (0 without IOKIT_FEATURE_REGISTERED_FILES). */
unsigned iokit_ring_fixed_file_slots(const struct iokit_ring *ring);
/* Start of provided buffer `buffer_id` (NULL without IOKIT_FEATURE_BUFFER_RING). */
char *iokit_ring_recv_buffer(const struct iokit_ring *ring, unsigned buffer_id);
void iokit_ring_counters(const struct iokit_ring *ring, struct iokit_counters *out);

/* A batch (IOKIT_READ_BATCH, IOKIT_WRITE_BATCH): `count` blocks at `count` offsets, each with a result of its own.
 * Block i is `base + i * block_size` when `base` is set, else blocks[i]. Everything the pointers point to stays alive
 * (Python holds it) until the batch's final completion. */
struct iokit_batch {
	uint64_t id;                /* the op's id, reported with the batch's one completion */
	char *base;                 /* one buffer of count * block_size bytes, or NULL */
	const struct iovec *blocks; /* or a buffer per block */
	const int64_t *offsets;
	int32_t *results;           /* results[i]: block i's bytes or -errno, written as its CQE is reaped */
	uint32_t count;
	uint32_t block_size;
	int32_t fd;                 /* fd, or the fixed-file slot when fixed_file is set */
	uint8_t write;
	uint8_t fixed_file;
};

/* Start a batch on the ring: one SQE per block, as many as the SQ takes now, then (if `submit_now`) one submit; else
 * the SQEs go in with the next submit or wait. *handle_out is the
 * batch's record, the caller's to name in the calls below until the batch's completion is reaped. The batch completes
 * once, when the CQE of its last block is reaped: iokit_ring_wait() reports (id, outcome) like any op's completion.
 * Returns the number of blocks prepared; fewer than count: call iokit_ring_continue_batch() after the next wait. */
int iokit_ring_submit_batch(struct iokit_ring *ring, const struct iokit_batch *batch, int submit_now,
			    void **handle_out);
/* Prepare the blocks the SQ had no room for; returns how many blocks are still waiting for room. */
int iokit_ring_continue_batch(struct iokit_ring *ring, void *handle);
/* Cancel a batch: blocks not in the SQ yet settle with -ECANCELED at once; each block the kernel has and has not
 * completed gets an ASYNC_CANCEL (queued: the next wait submits it). Returns 1 if the batch settled here (its outcome
 * in *outcome; the handle is gone), 0 if its completion will be reaped, -EBUSY if some cancels found no room in the
 * SQ: call again after a wait. */
int iokit_ring_cancel_batch(struct iokit_ring *ring, void *handle, int32_t *outcome);

/* The same batch without a ring: one pread (pwrite) per block, in the calling thread (the blocking backend, a worker
 * thread; cffi releases the GIL for the call). Checks *stop before each block (stop may be NULL): once it is nonzero
 * the blocks not started get -ECANCELED. Returns the batch's outcome. */
int32_t iokit_file_batch(int fd, int write, char *base, uint32_t block_size, const struct iovec *blocks,
			 const int64_t *offsets, int32_t *results, uint32_t count, const volatile int32_t *stop);
/* A batch's outcome from its blocks' results: count when none failed; else -ECANCELED if any block was cancelled,
 * else the first failed block's -errno. */
int32_t iokit_batch_outcome(const int32_t *results, uint32_t count);

/* The address family of socket `fd` (AF_INET, ...) or -errno. */
int iokit_socket_family(int fd);

#endif
