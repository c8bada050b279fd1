/*
 * iokit_ring_internal.h: the ring as both of our extensions see it.
 *
 * Two extension modules drive one ring: the cffi module (iokit._uring_ffi, the Backend API's ops) and the native
 * engine (iokit._engine, the hot path of the runtime). Each is compiled with its own copy of iokit_uring.c; they share
 * the `struct iokit_ring` itself, handed from the cffi side to the engine once, as an integer. So its layout lives
 * here, in one place, and never crosses into Python.
 *
 * Who reaps: while an engine is attached (`engine_completion` set), only the engine waits on the ring. Its CQEs
 * (user_data tagged UD_ENGINE) go to `engine_completion`, called with the GIL held; every other op's CQE goes into the
 * caller's arrays for the Python backend, exactly as iokit_ring_wait() would put it there.
 */
#ifndef IOKIT_RING_INTERNAL_H
#define IOKIT_RING_INTERNAL_H

#include "iokit_uring.h"

#include <liburing.h>
#include <stdbool.h>

#define TAG(n) ((1ULL << 63) | ((uint64_t)(n) << 56))
#define UD_LINK_TIMEOUT TAG(1)
#define UD_CANCEL TAG(2)
#define UD_WAKE TAG(3)
#define UD_PROBE TAG(4)
#define UD_ENGINE TAG(5)        /* an engine request: the low 56 bits are the engine's own (fd, kind, generation) */
#define UD_ENGINE_CANCEL TAG(6) /* the result of a cancel the engine asked for: nothing to do */
#define UD_BATCH TAG(7)         /* a block of a batch: the low 56 bits are the address of its slot in the batch's record */
#define UD_TAG(user_data) ((user_data) & ~IOKIT_MAX_ID)
#define RECV_BUFFER_GROUP 0

struct iokit_ring {
	struct io_uring ring;
	uint32_t features;
	int wake_fd;
	bool wake_multishot;   /* the wakeup poll stays armed across CQEs (IORING_POLL_ADD_MULTI, 5.13) */
	bool wake_armed;
	bool woken;            /* a wakeup was reaped during the current wait */
	struct __kernel_timespec *timespecs; /* one per SQE slot: see slot_timespec() */
	unsigned fixed_file_slots;
	/* Provided buffers for multishot recv: a ring of buffer descriptors shared with the kernel, and the buffers. */
	struct io_uring_buf_ring *buf_ring;
	size_t buf_ring_bytes;
	char *buffers;
	unsigned buffer_count;     /* the ring's capacity; the buffers' memory is mapped for all of them... */
	unsigned buffers_in_ring;  /* ...but only these were ever given to the kernel: more as load needs them */
	bool buffers_short;        /* a recv found no buffer (-ENOBUFS) since the last wait: add some */
	unsigned buffer_size;
	uint16_t *lent;        /* buffers handed to the caller by the last wait; the next call gives them back */
	unsigned lent_count;
	struct iokit_counters counters;
	/* The attached engine, if any: called for each UD_ENGINE CQE during a reap. */
	void (*engine_completion)(void *engine, const struct io_uring_cqe *cqe);
	void *engine;
};

/* The pieces of iokit_ring_wait(), for the engine, which must release the GIL around the blocking enter alone. */
void iokit_ring_before_wait(struct iokit_ring *r);
int iokit_ring_enter(struct iokit_ring *r, int64_t timeout_ns);
unsigned iokit_ring_reap(struct iokit_ring *r, uint64_t *ids, int32_t *results, uint32_t *cqe_flags, unsigned max);
/* Make room for `count` SQEs (submitting what is queued if the SQ is full); -EBUSY if there is still none. */
int iokit_ring_reserve(struct iokit_ring *r, unsigned count);
/* Give provided buffer `buffer_id` back to the kernel now (its bytes have been copied out). */
void iokit_ring_return_buffer(struct iokit_ring *r, unsigned buffer_id);

#endif
