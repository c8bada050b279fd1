/*
 * iokit_engine.c: the native engine, the inner cycle of the `epoll` and `uring` loops in C.
 *
 * Why it exists: driven from Python, every message cost a Python Op, an in-flight table entry, a completion object
 * and a task resume through Python frames, about 10 us of CPU against uvloop's 3.7. Here one call per turn flushes
 * what tasks queued, waits (io_uring_enter or epoll_wait, the GIL released), reaps, and for each completion resumes
 * the waiting task's coroutine with PyIter_Send and takes the trap it yields next, all in C. Python runs only the
 * user's code between two awaits.
 *
 * The pieces:
 * - Trap: what a task awaits for a socket op (receive, recv_into, send_all, accept, close, shutdown_write). It is its
 *   own awaitable: the first am_send yields the trap itself to whoever drives the coroutine, the second returns the
 *   result (or raises the error) stored on it. No generator frame, no Python Op per message.
 * - TaskBase: the C part of iokit's Task (its coroutine, what it is parked on, and whether a cancel is pending), so
 *   the engine reads them without attribute lookups.
 * - Conn: per fd, what the engine knows of a socket: the parked reader, writer, acceptor or closer; bytes received
 *   and not yet asked for; bytes queued to send. Found by fd in a table; a generation number in every kernel tag
 *   makes a late event for an earlier socket of the same number harmless.
 * - Loop: the table, the two kernel interfaces and the dispatch.
 *
 * Kernel facts relied on:
 * - io_uring: a multishot recv (IORING_RECV_MULTISHOT, 6.0) with IOSQE_BUFFER_SELECT posts a CQE per chunk in a
 *   buffer of the provided buffer ring; IORING_CQE_F_MORE says it stays armed. We copy the bytes out at once and give
 *   the buffer back, so no buffer is pinned by an idle connection. Without F_MORE the request is over (peer closed,
 *   error, -ENOBUFS when every buffer was lent, or our cancel).
 * - io_uring: the kernel reads a send's buffer until the send's CQE; the iovec array and msghdr of a SENDMSG must
 *   stay put until then too. A Conn owns both and never moves them while a send is in flight.
 * - epoll: EPOLLET, registered once per fd for its life: an event is a *change* to ready, so an op waits only after
 *   its syscall said EAGAIN, and each event retries until EAGAIN again.
 * - A socket fd may be closed only once no io_uring request on it is in flight: close() waits for the final CQEs
 *   (cancelling the multishot recv first) and for the queued bytes to leave.
 *
 * Ownership (the one rule): a Trap parked on a Conn holds a reference to its task, the Conn holds one to the trap,
 * and the task's _abort holds one to the trap; all three are dropped in complete_and_wake()/schedule_cancelled(),
 * the only places a parked trap ends. A queued send holds a reference to its `bytes` (or owns a malloc'd copy of a
 * mutable buffer) until the kernel has taken those bytes.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <structmember.h>

#include "iokit_ring_internal.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

/* The trap kinds, and the kinds of engine SQE (in the low bits of the tag). */
enum { T_RECEIVE = 1, T_RECV_INTO, T_SEND, T_ACCEPT, T_CLOSE, T_SHUTDOWN, T_WAIT_READABLE };
enum { SQE_RECV = 1, SQE_SEND, SQE_ACCEPT };
enum { MODE_URING = 1, MODE_EPOLL };

/* Bounds. A queue over SEND_HIGH_WATER makes a sender wait until it drains below SEND_LOW_WATER (backpressure); on
 * uring, received bytes nobody asked for past RECV_HIGH_WATER stop the multishot recv until a reader takes them. */
#define SEND_HIGH_WATER (256 * 1024)
#define SEND_LOW_WATER (64 * 1024)
#define RECV_HIGH_WATER (256 * 1024)
#define COPY_CHUNK 4096          /* smallest owned send buffer: small writes of one turn coalesce into it */
#define PIN_AT 8192              /* a mutable buffer this large is sent from where it is (uring) or at once (epoll) */
#define IOV_BATCH 64             /* iovecs per send */
#define EPOLL_EVENTS 256
#define SCRATCH_BYTES 65536      /* epoll's loop-wide receive buffer */
#define FOREVER_SLICE_NS (60LL * 1000 * 1000 * 1000)

/* user_data of an engine SQE: UD_ENGINE | generation (20 bits) << 36 | kind (4 bits) << 32 | fd (32 bits). */
#define ENGINE_UD(fd, kind, gen) (UD_ENGINE | ((uint64_t)((gen) & 0xFFFFF) << 36) | ((uint64_t)(kind) << 32) | \
				  (uint32_t)(fd))
#define UD_FD(ud) ((int)(uint32_t)(ud))
#define UD_KIND(ud) ((int)(((ud) >> 32) & 0xF))
#define UD_GEN(ud) ((uint32_t)(((ud) >> 36) & 0xFFFFF))
/* epoll_data of an engine fd: generation << 32 | fd; the nested Python epoll fd has a tag of its own. */
#define EPOLL_PYTHON_TAG (~(uint64_t)0)

static PyObject *Cancelled;         /* iokit._errors.Cancelled, set by configure() */
static __thread PyObject *current;  /* the task running on this thread (strong), for iokit.current_task() */

/* ---------------------------------------------------------------------------------------------------------------- */
/* TaskBase                                                                                                          */

typedef struct {
	PyObject_HEAD
	PyObject *coro;
	PyObject *abort;       /* what the task is parked on (Python's `_abort`): a Trap, an Op or a Park (iokit/runtime/traps.py) */
	char cancel_pending;   /* kept equal to task.scope.is_cancelled() by the scopes */
} TaskBase;

static int task_traverse(TaskBase *self, visitproc visit, void *arg)
{
	Py_VISIT(self->coro);
	Py_VISIT(self->abort);
	return 0;
}

static int task_clear(TaskBase *self)
{
	Py_CLEAR(self->coro);
	Py_CLEAR(self->abort);
	return 0;
}

static void task_dealloc(TaskBase *self)
{
	PyObject_GC_UnTrack(self);
	task_clear(self);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef task_members[] = {
	{"coro", T_OBJECT, offsetof(TaskBase, coro), 0, "the task's coroutine"},
	{"_abort", T_OBJECT, offsetof(TaskBase, abort), 0, "what the task is parked on, or None"},
	{"cancel_pending", T_BOOL, offsetof(TaskBase, cancel_pending), 0, "a scope covering the task is cancelled"},
	{NULL},
};

static PyTypeObject TaskBaseType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "iokit._engine.TaskBase",
	.tp_basicsize = sizeof(TaskBase),
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
	.tp_doc = "The part of iokit.Task the engine reads: its coroutine, what it waits on, a pending cancel.",
	.tp_traverse = (traverseproc)task_traverse,
	.tp_clear = (inquiry)task_clear,
	.tp_dealloc = (destructor)task_dealloc,
	.tp_members = task_members,
	.tp_new = PyType_GenericNew,
};

/* ---------------------------------------------------------------------------------------------------------------- */
/* Trap                                                                                                              */

enum { TRAP_NEW = 0, TRAP_YIELDED, TRAP_DONE };

typedef struct Trap {
	PyObject_HEAD
	int kind;
	int fd;
	int state;
	char cancel_requested;
	Py_ssize_t size;         /* T_RECEIVE: the most bytes to return */
	Py_buffer view;          /* T_RECV_INTO: where to put them; T_SEND: what to send (view.obj set while held) */
	PyObject *result;        /* TRAP_DONE: the value the await returns... */
	PyObject *error;         /* ...or the exception it raises */
	TaskBase *task;          /* while parked: the task to resume */
	struct Trap *next;       /* in a Conn's queue of acceptors */
} Trap;

static PyTypeObject TrapType;

static Trap *trap_new(int kind, int fd)
{
	Trap *t = PyObject_New(Trap, &TrapType);

	if (!t)
		return NULL;
	t->kind = kind;
	t->fd = fd;
	t->state = TRAP_NEW;
	t->cancel_requested = 0;
	t->size = 0;
	t->view.obj = NULL;
	t->result = NULL;
	t->error = NULL;
	t->task = NULL;
	t->next = NULL;
	return t;
}

static void trap_release_view(Trap *t)
{
	if (t->view.obj)
		PyBuffer_Release(&t->view);
	t->view.obj = NULL;
}

static void trap_dealloc(Trap *t)
{
	trap_release_view(t);
	Py_XDECREF(t->result);
	Py_XDECREF(t->error);
	Py_XDECREF(t->task);
	PyObject_Free(t);
}

/* Finish a trap: it returns `result` (stolen) or raises `error` (stolen) when its task resumes. */
static void trap_done(Trap *t, PyObject *result, PyObject *error)
{
	t->state = TRAP_DONE;
	trap_release_view(t);
	Py_XSETREF(t->result, result);
	Py_XSETREF(t->error, error);
}

static PyObject *os_error(int err)
{
	PyObject *args = Py_BuildValue("(is)", err, strerror(err));
	PyObject *exc;

	if (!args)
		return NULL;
	exc = PyObject_Call(PyExc_OSError, args, NULL); /* OSError picks the subclass: ConnectionResetError... */
	Py_DECREF(args);
	return exc;
}

static void trap_fail_errno(Trap *t, int err)
{
	PyObject *exc = os_error(err);

	if (!exc) { /* no memory for the exception: raise that instead */
		PyObject *type, *value, *tb;

		PyErr_Fetch(&type, &value, &tb);
		PyErr_NormalizeException(&type, &value, &tb);
		Py_XDECREF(type);
		Py_XDECREF(tb);
		exc = value;
	}
	trap_done(t, NULL, exc);
}

static void trap_fail_cancelled(Trap *t)
{
	trap_done(t, NULL, PyObject_CallNoArgs(Cancelled));
}

/* The await protocol: first yield the trap itself (the driver starts it), then deliver its outcome. */
static PySendResult trap_am_send(Trap *t, PyObject *arg, PyObject **presult)
{
	(void)arg;
	if (t->state == TRAP_NEW) {
		t->state = TRAP_YIELDED;
		Py_INCREF(t);
		*presult = (PyObject *)t;
		return PYGEN_NEXT;
	}
	if (t->state != TRAP_DONE) {
		PyErr_SetString(PyExc_RuntimeError, "an iokit operation was resumed before it completed");
		*presult = NULL;
		return PYGEN_ERROR;
	}
	if (t->error) {
		PyObject *error = t->error;

		t->error = NULL;
		PyErr_SetObject((PyObject *)Py_TYPE(error), error);
		Py_DECREF(error);
		*presult = NULL;
		return PYGEN_ERROR;
	}
	*presult = t->result ? t->result : Py_NewRef(Py_None);
	t->result = NULL;
	return PYGEN_RETURN;
}

/* For drivers that iterate instead of calling am_send (a tracing interpreter: coverage, debuggers). */
static PyObject *trap_iternext(Trap *t)
{
	PyObject *result;
	PySendResult r = trap_am_send(t, Py_None, &result);

	if (r == PYGEN_NEXT)
		return result;
	if (r == PYGEN_RETURN) {
		if (result == Py_None)
			PyErr_SetNone(PyExc_StopIteration);
		else
			_PyGen_SetStopIterationValue(result);
		Py_DECREF(result);
	}
	return NULL;
}

static PyObject *trap_send(Trap *t, PyObject *arg)
{
	(void)arg;
	return trap_iternext(t);
}

static PyObject *trap_await(Trap *t)
{
	return Py_NewRef(t);
}

static PyObject *trap_repr(Trap *t)
{
	static const char *names[] = {"?", "receive", "recv_into", "send_all", "accept", "close", "shutdown_write",
				      "wait_readable"};
	static const char *states[] = {"new", "waiting", "done"};

	return PyUnicode_FromFormat("<iokit engine %s fd=%d %s>", names[t->kind], t->fd, states[t->state]);
}

static PyMethodDef trap_methods[] = {
	{"send", (PyCFunction)trap_send, METH_O, NULL},
	{NULL},
};

static PyAsyncMethods trap_async = {
	.am_await = (unaryfunc)trap_await,
	.am_send = (sendfunc)trap_am_send,
};

static PyTypeObject TrapType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "iokit._engine.Trap",
	.tp_basicsize = sizeof(Trap),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "One socket operation a task awaits on the native engine.",
	.tp_dealloc = (destructor)trap_dealloc,
	.tp_as_async = &trap_async,
	.tp_iter = PyObject_SelfIter,
	.tp_iternext = (iternextfunc)trap_iternext,
	.tp_methods = trap_methods,
	.tp_repr = (reprfunc)trap_repr,
};

/* ---------------------------------------------------------------------------------------------------------------- */
/* Conn                                                                                                              */

typedef struct {
	PyObject *owner;     /* the `bytes` whose memory this is, or NULL: then `data` is our malloc'd copy... */
	Py_buffer *pinned;   /* ...or the caller's own buffer, pinned (uring, large): its sender waits until it is sent */
	char *data;
	Py_ssize_t len;
	Py_ssize_t cap;      /* owned copies: room for small writes to coalesce into */
} Segment;

typedef struct Conn {
	int fd;
	uint32_t gen;
	unsigned registered : 1;     /* epoll: in the engine's epoll set */
	unsigned recv_armed : 1;     /* uring: a multishot recv is in flight */
	unsigned recv_cancel_sent : 1;
	unsigned accept_in_flight : 1;
	unsigned accept_cancel_sent : 1;
	unsigned accept_multishot : 1; /* uring: the accept in flight goes on making connections (5.19) */
	unsigned send_in_flight : 1; /* uring: a send of segs[0..send_segments) is in flight */
	unsigned eof : 1;            /* the peer closed its side; readers get b"" */
	unsigned closing : 1;
	unsigned shut_write : 1;     /* shutdown(SHUT_WR) once the queue is empty */
	unsigned shut_done : 1;
	unsigned dirty : 1;          /* in the loop's flush list */
	unsigned dead : 1;           /* out of the table; freed at the end of the turn (see conn_retire) */
	unsigned want_recv : 1;      /* uring: arm the multishot recv at the next flush */
	unsigned want_accept : 1;
	unsigned want_cancel : 1;    /* uring: cancel what is in flight at the next flush */
	unsigned writer_cancelled : 1; /* uring: the parked writer was cancelled while a send was in flight */
	unsigned send_cancel_sent : 1;
	unsigned send_broken : 1;    /* a send_all was cancelled part way: the stream is cut, a close drops the queue */
	unsigned writer_pinned : 1;  /* the parked writer waits for its own (pinned) bytes to be sent, not for room */
	int error;                   /* a sticky errno: the connection failed; every later op raises it */
	Trap *reader, *writer, *closer; /* parked traps (strong) */
	Trap *acceptor, *acceptor_tail; /* acceptors, oldest first (several tasks may accept on one listener) */
	/* uring, a listener: connections the multishot accept made while no task was accepting, oldest first. */
	int *accepted;
	int accepted_len, accepted_cap;
	/* Received and not yet asked for (uring's multishot delivers whether or not a reader waits). */
	char *rq;
	Py_ssize_t rq_start, rq_len, rq_cap;
	/* Queued to send, oldest first; segs[0] starts `head_sent` bytes in. */
	Segment *segs;
	int nsegs, segs_cap, send_segments;
	Py_ssize_t head_sent, unsent;
	/* Positions in the whole outgoing stream: what send_all accepted, what the kernel took, and where the parked
	 * writer's bytes are, so a cancelled or failed send_all reports exactly how much of it went out. */
	long long enqueued_total, sent_total, writer_start;
	Py_ssize_t writer_len;
	struct iovec *iov;           /* the send's iovecs (uring: with the msghdr, stable until its CQE) */
	int iov_cap;                 /* grown to what a send needs: an idle connection keeps a small array */
	struct msghdr msg;
	struct Conn *next_dirty;
	struct Conn *next_dead;
	/* Protocol mode (attach_protocol): the engine calls the protocol's methods itself, as uvloop does. Only
	 * data_received is kept bound (it runs per chunk); the others, called once or under backpressure, are looked up
	 * when called (has_*: the protocol had them when attached), which saves 4 bound methods, 256 bytes a connection. */
	PyObject *protocol, *on_data, *on_closed;
	PyObject *owner;             /* the task the callbacks run as (iokit.current_task() inside them) */
	PyObject *transport;
	PyObject *lost_error;        /* what connection_lost() gets: the exception that ended the connection, or NULL */
	Py_ssize_t high_water, low_water;
	unsigned reading_paused : 1, writing_paused : 1, want_read : 1;
	unsigned has_eof : 1, has_lost : 1, has_pause : 1, has_resume : 1;
	unsigned eof_told : 1;       /* eof_received() was called: once per connection */
	unsigned retry_reader : 1;   /* an injected EAGAIN parked the reader with data there: retry it at the flush */
} Conn;

/* ---------------------------------------------------------------------------------------------------------------- */
/* Loop                                                                                                              */

typedef struct {
	PyObject_HEAD
	int mode;
	PyObject *ready_append;   /* driver._ready.append: tasks woken outside a dispatch (cancels) */
	PyObject *handle;         /* driver._handle(task, trap): a trap the engine does not know (park, Op, yield) */
	PyObject *finish_task;    /* driver._finish_task(task, result, error) */
	Conn **conns;
	int conns_cap;
	int live_conns;
	Conn *dirty;
	Conn *graveyard;          /* retired Conns, freed by bury() */
	uint32_t next_gen;
	PyObject *pending_error;  /* an exception from Python code run during a dispatch, raised by turn() */
	/* uring */
	struct iokit_ring *ring;
	uint64_t *ids;
	int32_t *results;
	uint32_t *cqe_flags;
	unsigned capacity;
	unsigned in_flight;       /* engine SQEs whose final CQE has not come */
	int draining;             /* the runtime has ended: requests are cancelled, nothing new is sent or armed */
	/* epoll */
	int epfd;
	int python_epfd;
	char *scratch;
	/* counters */
	unsigned long long resumes, traps, turns, completions, sends, stale;
	unsigned long long callbacks; /* protocol methods called */
	/* Fault injection (set_faults, for iokit.backends.faults): the rare cases of the hot path made common, with a
	 * seeded generator so that a failing run replays. 0 rates: off, and the checks cost one branch. */
	struct {
		int on;
		double eagain, short_transfer, reset, cancel_race;
		uint64_t state;
		unsigned long long eagains, shorts, resets, cancel_races;
	} faults;
} Loop;

static void run_task(Loop *L, TaskBase *task, PyObject *value, PyObject *exc);
static void note_error(Loop *L);
static PyObject *raise_pending(Loop *L);

/* xorshift64*: true with probability `rate`. */
static int fault_roll(Loop *L, double rate)
{
	uint64_t x;

	if (!L->faults.on || rate <= 0)
		return 0;
	x = L->faults.state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	L->faults.state = x;
	return (double)((x * 0x2545F4914F6CDD1DULL) >> 11) * (1.0 / 9007199254740992.0) < rate;
}

static Conn *conn_get(Loop *L, int fd)
{
	return fd >= 0 && fd < L->conns_cap ? L->conns[fd] : NULL;
}

static Conn *conn_for(Loop *L, int fd)
{
	Conn *c = conn_get(L, fd);

	if (c)
		return c;
	if (fd < 0) {
		errno = EBADF;
		return NULL;
	}
	if (fd >= L->conns_cap) {
		int cap = L->conns_cap ? L->conns_cap : 256;
		Conn **grown;

		while (cap <= fd)
			cap *= 2;
		grown = PyMem_Realloc(L->conns, (size_t)cap * sizeof *grown);
		if (!grown) {
			errno = ENOMEM;
			return NULL;
		}
		memset(grown + L->conns_cap, 0, (size_t)(cap - L->conns_cap) * sizeof *grown);
		L->conns = grown;
		L->conns_cap = cap;
	}
	c = PyMem_Calloc(1, sizeof *c);
	if (!c) {
		errno = ENOMEM;
		return NULL;
	}
	c->fd = fd;
	c->gen = ++L->next_gen & 0xFFFFF;
	L->conns[fd] = c;
	L->live_conns++;
	return c;
}

static void mark_dirty(Loop *L, Conn *c)
{
	if (c->dirty)
		return;
	c->dirty = 1;
	c->next_dirty = L->dirty;
	L->dirty = c;
}

/* The kernel is done with a segment's memory: let it go (the one place, whatever kind of segment it is). */
static void segment_release(Segment *s)
{
	if (s->pinned) {
		PyBuffer_Release(s->pinned);
		PyMem_Free(s->pinned);
	} else if (s->owner) {
		Py_DECREF(s->owner);
	} else {
		PyMem_Free(s->data);
	}
}

static void segments_drop(Conn *c)
{
	int i;

	for (i = 0; i < c->nsegs; i++)
		segment_release(&c->segs[i]);
	c->nsegs = 0;
	c->head_sent = 0;
	c->unsent = 0;
	c->send_segments = 0;
}

static void protocol_release(Conn *c)
{
	Py_CLEAR(c->protocol);
	Py_CLEAR(c->on_data);
	Py_CLEAR(c->on_closed);
	Py_CLEAR(c->owner);
	Py_CLEAR(c->transport);
	Py_CLEAR(c->lost_error);
}

static void conn_free(Conn *c)
{
	PyMem_Free(c->accepted);
	protocol_release(c);
	segments_drop(c);
	PyMem_Free(c->segs);
	PyMem_Free(c->iov);
	PyMem_Free(c->rq);
	PyMem_Free(c);
}

/*
 * Take the Conn out of the table (its fd number may be reused from now on). Its memory stays until bury(), at the end
 * of the turn: a dispatch that woke a task (which may have closed this very connection) can still look at `dead`.
 */
static void conn_retire(Loop *L, Conn *c)
{
	if (c->dead)
		return;
	/* Connections the kernel made that no task took: nobody will now. */
	while (c->accepted_len)
		close(c->accepted[--c->accepted_len]);
	if (L->conns[c->fd] == c) {
		L->conns[c->fd] = NULL;
		L->live_conns--;
	}
	c->dead = 1;
	c->next_dead = L->graveyard;
	L->graveyard = c;
}

static void bury(Loop *L)
{
	Conn **link = &L->dirty;

	if (!L->graveyard)
		return;
	while (*link) { /* the dead leave the flush list first */
		if ((*link)->dead)
			*link = (*link)->next_dirty;
		else
			link = &(*link)->next_dirty;
	}
	while (L->graveyard) {
		Conn *c = L->graveyard;

		L->graveyard = c->next_dead;
		conn_free(c);
	}
}

/* --- waking tasks ----------------------------------------------------------------------------------------------- */

/* Detach a parked trap from its task, leaving the task's reference with the caller. */
static TaskBase *trap_unpark(Trap *t)
{
	TaskBase *task = t->task;

	t->task = NULL;
	if (task && task->abort == (PyObject *)t)
		Py_CLEAR(task->abort);
	return task;
}

/* A parked trap is done: resume its task now, here, in C (the hot path). Drops the Conn's reference `t`. */
static void complete_and_wake(Loop *L, Trap *t)
{
	TaskBase *task = trap_unpark(t);

	Py_DECREF(t);
	if (task) {
		run_task(L, task, Py_None, NULL);
		Py_DECREF(task);
	}
}

/* A parked trap is done outside a dispatch (a cancel asked from Python): its task goes on the driver's ready queue,
 * and resumes there (the trap raises or returns when the coroutine is sent None). Drops the reference `t`. */
static void schedule(Loop *L, Trap *t)
{
	TaskBase *task = trap_unpark(t);

	Py_DECREF(t);
	if (task) {
		PyObject *entry = PyTuple_Pack(3, (PyObject *)task, Py_None, Py_None);
		PyObject *r = entry ? PyObject_CallOneArg(L->ready_append, entry) : NULL;

		Py_XDECREF(entry);
		if (!r)
			note_error(L);
		Py_XDECREF(r);
		Py_DECREF(task);
	}
}

static void park(Trap **slot, Trap *t, TaskBase *task)
{
	Py_INCREF(t);
	*slot = t;
	Py_INCREF(task);
	t->task = task;
	Py_INCREF(t);
	Py_XSETREF(task->abort, (PyObject *)t);
}

static void acceptor_push(Conn *c, Trap *t, TaskBase *task)
{
	Trap *slot;

	park(&slot, t, task);
	t->next = NULL;
	if (c->acceptor_tail)
		c->acceptor_tail->next = t;
	else
		c->acceptor = t;
	c->acceptor_tail = t;
}

/* The oldest acceptor, out of the queue (the queue's reference goes to the caller). */
static Trap *acceptor_pop(Conn *c)
{
	Trap *t = c->acceptor;

	if (t) {
		c->acceptor = t->next;
		if (!c->acceptor)
			c->acceptor_tail = NULL;
		t->next = NULL;
	}
	return t;
}

/* uring: a connection the multishot accept made while no task waited; 0, or -1 with no memory (then it is closed). */
static int accepted_push(Conn *c, int fd)
{
	if (c->accepted_len == c->accepted_cap) {
		int cap = c->accepted_cap ? 2 * c->accepted_cap : 8;
		int *grown = PyMem_Realloc(c->accepted, (size_t)cap * sizeof *grown);

		if (!grown) {
			close(fd);
			return -1;
		}
		c->accepted = grown;
		c->accepted_cap = cap;
	}
	c->accepted[c->accepted_len++] = fd;
	return 0;
}

static int accepted_pop(Conn *c)
{
	int fd = c->accepted[0];

	memmove(c->accepted, c->accepted + 1, (size_t)--c->accepted_len * sizeof *c->accepted);
	return fd;
}

static int acceptor_remove(Conn *c, Trap *t)
{
	Trap **link = &c->acceptor, *previous = NULL;

	while (*link && *link != t) {
		previous = *link;
		link = &(*link)->next;
	}
	if (!*link)
		return 0;
	*link = t->next;
	if (c->acceptor_tail == t)
		c->acceptor_tail = previous;
	t->next = NULL;
	return 1;
}

static void note_error(Loop *L)
{
	PyObject *type, *value, *tb;

	PyErr_Fetch(&type, &value, &tb);
	PyErr_NormalizeException(&type, &value, &tb);
	if (value && tb)
		PyException_SetTraceback(value, tb);
	Py_XDECREF(type);
	Py_XDECREF(tb);
	if (!L->pending_error)
		L->pending_error = value;
	else
		Py_XDECREF(value);
}

/* --- receiving ---------------------------------------------------------------------------------------------------- */

static int rq_append(Conn *c, const char *data, Py_ssize_t n)
{
	if (c->rq_start && c->rq_start + c->rq_len + n > c->rq_cap) {
		memmove(c->rq, c->rq + c->rq_start, (size_t)c->rq_len);
		c->rq_start = 0;
	}
	if (c->rq_len + n > c->rq_cap) {
		Py_ssize_t cap = c->rq_cap ? c->rq_cap : 4096;
		char *grown;

		while (cap < c->rq_len + n)
			cap *= 2;
		grown = PyMem_Realloc(c->rq, (size_t)cap);
		if (!grown)
			return -1;
		c->rq = grown;
		c->rq_cap = cap;
	}
	memcpy(c->rq + c->rq_start + c->rq_len, data, (size_t)n);
	c->rq_len += n;
	return 0;
}

/* Hand up to what `t` asks of `data` to the reader trap; return the bytes used (-1: no memory, trap failed). */
static Py_ssize_t give_to_reader(Trap *t, const char *data, Py_ssize_t n)
{
	if (t->kind == T_RECEIVE) {
		Py_ssize_t take = n < t->size ? n : t->size;
		PyObject *bytes = PyBytes_FromStringAndSize(data, take);

		if (!bytes) {
			PyObject *type, *value, *tb;

			PyErr_Fetch(&type, &value, &tb);
			Py_XDECREF(type);
			Py_XDECREF(tb);
			trap_done(t, NULL, value);
			return -1;
		}
		trap_done(t, bytes, NULL);
		return take;
	}
	if (t->kind == T_RECV_INTO) {
		Py_ssize_t take = n < t->view.len ? n : t->view.len;

		memcpy(t->view.buf, data, (size_t)take);
		trap_done(t, PyLong_FromSsize_t(take), NULL);
		return take;
	}
	trap_done(t, NULL, NULL); /* T_WAIT_READABLE: data is here */
	return 0;
}

/* A reader that asks now: serve it from what is queued, the end of stream or the connection's error. 1: done. */
static int serve_from_queue(Conn *c, Trap *t)
{
	if (c->rq_len) {
		Py_ssize_t used = give_to_reader(t, c->rq + c->rq_start, c->rq_len);

		if (used > 0) {
			c->rq_start += used;
			c->rq_len -= used;
			if (!c->rq_len) {
				c->rq_start = 0;
				if (c->rq_cap > 16384) { /* a burst grew it: an idle connection should not keep it */
					PyMem_Free(c->rq);
					c->rq = NULL;
					c->rq_cap = 0;
				}
			}
		}
		return 1;
	}
	if (c->error) {
		trap_fail_errno(t, c->error);
		return 1;
	}
	if (c->eof) {
		if (t->kind == T_RECEIVE)
			trap_done(t, PyBytes_FromStringAndSize(NULL, 0), NULL);
		else if (t->kind == T_RECV_INTO)
			trap_done(t, PyLong_FromLong(0), NULL);
		else
			trap_done(t, NULL, NULL);
		return 1;
	}
	return 0;
}

/* --- sending ------------------------------------------------------------------------------------------------------ */

static int segments_reserve(Conn *c)
{
	if (c->nsegs < c->segs_cap)
		return 0;
	{
		int cap = c->segs_cap ? c->segs_cap * 2 : 4;
		Segment *grown = PyMem_Realloc(c->segs, (size_t)cap * sizeof *grown);

		if (!grown)
			return -1;
		c->segs = grown;
		c->segs_cap = cap;
	}
	return 0;
}

/* Queue `view` to send. `bytes` are kept by reference (immutable: nobody can change them under the kernel); any
 * other buffer is copied, since its owner may reuse it as soon as send_all returns. */
static int enqueue(Conn *c, PyObject *obj, const char *data, Py_ssize_t len)
{
	Segment *last = c->nsegs ? &c->segs[c->nsegs - 1] : NULL;

	if (!len)
		return 0;
	if (PyBytes_CheckExact(obj)) {
		if (segments_reserve(c) < 0)
			return -1;
		Py_INCREF(obj);
		c->segs[c->nsegs++] = (Segment){obj, NULL, (char *)data, len, len};
	} else if (last && !last->owner && c->nsegs > c->send_segments && last->cap - last->len >= len) {
		/* Coalesce into the last copy, which no send in flight points into. */
		memcpy(last->data + last->len, data, (size_t)len);
		last->len += len;
	} else {
		Py_ssize_t cap = len > COPY_CHUNK ? len : COPY_CHUNK;
		char *copy;

		if (segments_reserve(c) < 0)
			return -1;
		copy = PyMem_Malloc((size_t)cap);
		if (!copy)
			return -1;
		memcpy(copy, data, (size_t)len);
		c->segs[c->nsegs++] = (Segment){NULL, NULL, copy, len, cap};
	}
	c->unsent += len;
	c->enqueued_total += len;
	return 0;
}

/* uring, a large mutable buffer: no copy; the queue keeps the caller's buffer exported (so it cannot be resized or
 * freed) until the kernel has sent it, and the sender waits until then, so it cannot write into it either. `view`
 * moves into the segment. */
static int enqueue_pinned(Conn *c, Py_buffer *view, Py_ssize_t skip)
{
	Py_buffer *pinned = PyMem_Malloc(sizeof *pinned);
	Py_ssize_t len = view->len - skip;

	if (!pinned || segments_reserve(c) < 0) {
		PyMem_Free(pinned);
		return -1;
	}
	*pinned = *view;
	view->obj = NULL;
	c->segs[c->nsegs++] = (Segment){NULL, pinned, (char *)pinned->buf + skip, len, len};
	c->unsent += len;
	c->enqueued_total += len;
	return 0;
}

/* The kernel took `n` bytes from the front of the queue: release the segments it finished. */
static void consume(Conn *c, Py_ssize_t n)
{
	int done = 0;

	c->unsent -= n;
	c->sent_total += n;
	while (n > 0 && done < c->nsegs) {
		Segment *s = &c->segs[done];
		Py_ssize_t left = s->len - c->head_sent;

		if (n < left) {
			c->head_sent += n;
			break;
		}
		n -= left;
		c->head_sent = 0;
		segment_release(s);
		done++;
	}
	if (done) {
		memmove(c->segs, c->segs + done, (size_t)(c->nsegs - done) * sizeof *c->segs);
		c->nsegs -= done;
	}
}

/* Take the last `n` queued bytes back (none of them is in a send in flight). */
static void truncate_tail(Conn *c, Py_ssize_t n)
{
	c->unsent -= n;
	c->enqueued_total -= n;
	while (n > 0 && c->nsegs) {
		Segment *s = &c->segs[c->nsegs - 1];
		Py_ssize_t sendable = s->len - (c->nsegs == 1 ? c->head_sent : 0);

		if (sendable > n) {
			s->len -= n;
			break;
		}
		n -= sendable;
		segment_release(s);
		c->nsegs--;
		if (!c->nsegs)
			c->head_sent = 0;
	}
}

/* How much of the parked writer's data the kernel has taken. */
static Py_ssize_t writer_sent(const Conn *c)
{
	long long sent = c->sent_total - c->writer_start;

	return sent < 0 ? 0 : sent > c->writer_len ? c->writer_len : (Py_ssize_t)sent;
}

static void set_bytes_sent(PyObject *exc, Py_ssize_t sent)
{
	PyObject *count = PyLong_FromSsize_t(sent);

	if (!count || !exc || PyObject_SetAttrString(exc, "bytes_sent", count) < 0)
		PyErr_Clear();
	Py_XDECREF(count);
}

/* The parked writer is cancelled: what the kernel has not taken of its data is taken back (if nothing was queued
 * behind it), and Cancelled carries bytes_sent. The caller wakes or schedules the trap. */
static void cut_writer(Conn *c, Trap *t)
{
	Py_ssize_t sent = writer_sent(c);

	if (c->enqueued_total == c->writer_start + c->writer_len)
		truncate_tail(c, c->writer_len - sent);
	else
		sent = c->writer_len; /* others' bytes follow it: it all goes out, in order */
	c->writer_cancelled = 0;
	c->writer_pinned = 0;
	c->send_broken = 1;
	trap_fail_cancelled(t);
	set_bytes_sent(t->error, sent);
}

static int fill_iov(Conn *c)
{
	int count = c->nsegs < IOV_BATCH ? c->nsegs : IOV_BATCH, i;

	if (count > c->iov_cap) {
		int cap = count < 4 ? 4 : count;
		struct iovec *grown = PyMem_Realloc(c->iov, (size_t)cap * sizeof *grown);

		if (!grown)
			return -1;
		c->iov = grown;
		c->iov_cap = cap;
	}
	for (i = 0; i < count; i++) {
		c->iov[i].iov_base = c->segs[i].data + (i == 0 ? c->head_sent : 0);
		c->iov[i].iov_len = (size_t)(c->segs[i].len - (i == 0 ? c->head_sent : 0));
	}
	return count;
}

/* The queue moved (sent, or failed): wake a writer below the low-water mark and a closer or shutdown waiting for an
 * empty queue. Runs Python. */
static void after_send_progress(Loop *L, Conn *c);
static PyObject *protocol_call_method(Loop *L, Conn *c, PyObject *method, PyObject *arg);
static PyObject *protocol_call_named(Loop *L, Conn *c, int has, const char *name, PyObject *arg);
static void protocol_callback_failed(Loop *L, Conn *c, PyObject *where);
static void protocol_fail(Loop *L, Conn *c, int err);

/* A send failed (or memory ran out): the connection is broken. Its tasks get the error; a protocol connection is
 * aborted, and connection_lost() gets the error (asyncio's transports do the same), or its writes would vanish. */
static void fail_conn(Loop *L, Conn *c, int err)
{
	Trap *reader = c->reader, *writer = c->writer;

	if (c->protocol) {
		protocol_fail(L, c, err);
		return;
	}
	if (!c->error)
		c->error = err;
	segments_drop(c);
	c->reader = c->writer = NULL;
	if (reader) {
		trap_fail_errno(reader, c->error);
		complete_and_wake(L, reader);
	}
	if (writer) {
		c->writer_pinned = 0;
		trap_fail_errno(writer, err);
		set_bytes_sent(writer->error, writer_sent(c));
		complete_and_wake(L, writer);
	}
}

/* epoll: write what is queued, as one writev per IOV_BATCH segments, until done or EAGAIN. */
static void epoll_flush(Loop *L, Conn *c)
{
	while (c->unsent && !c->error) {
		int count = fill_iov(c);
		ssize_t n;

		if (count < 0) {
			c->error = ENOMEM;
			break;
		}
		if (fault_roll(L, L->faults.short_transfer)) {
			/* The kernel took one byte: the rest goes at the next turn's flush. */
			L->faults.shorts++;
			n = send(c->fd, c->iov[0].iov_base, 1, MSG_NOSIGNAL);
			if (n > 0) {
				consume(c, n);
				mark_dirty(L, c);
				return;
			}
		} else {
			n = count == 1 ? send(c->fd, c->iov[0].iov_base, c->iov[0].iov_len, MSG_NOSIGNAL)
				       : writev(c->fd, c->iov, count);
		}
		L->sends++;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return; /* EPOLLOUT will say when there is room: registered below if not yet */
			fail_conn(L, c, errno);
			return;
		}
		consume(c, n);
	}
}

static void after_send_progress(Loop *L, Conn *c)
{
	if (c->shut_write && !c->shut_done && !c->unsent && !c->send_in_flight) {
		c->shut_done = 1;
		shutdown(c->fd, SHUT_WR);
	}
	if (c->protocol && c->writing_paused && c->unsent <= c->low_water && !c->dead) {
		c->writing_paused = 0;
		Py_XDECREF(protocol_call_named(L, c, c->has_resume, "resume_writing", NULL));
	}
	if (c->writer && (c->writer_pinned ? c->sent_total >= c->writer_start + c->writer_len
					   : c->unsent <= SEND_LOW_WATER)) {
		Trap *writer = c->writer;

		c->writer_pinned = 0;
		c->writer = NULL;
		if (c->error) {
			trap_fail_errno(writer, c->error);
			set_bytes_sent(writer->error, writer_sent(c));
		} else {
			trap_done(writer, NULL, NULL);
		}
		complete_and_wake(L, writer);
	}
}

/* --- epoll registration ------------------------------------------------------------------------------------------- */

static int epoll_register(Loop *L, Conn *c)
{
	struct epoll_event ev;

	if (c->registered)
		return 0;
	ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
	ev.data.u64 = ((uint64_t)c->gen << 32) | (uint32_t)c->fd;
	if (epoll_ctl(L->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
		return -errno;
	c->registered = 1;
	return 0;
}

/* --- closing ------------------------------------------------------------------------------------------------------ */

/* May the fd be closed now? Not while queued bytes wait to leave, nor while a request of ours on it is in the
 * kernel (then the cancels that end them are asked for). */
static int ready_to_close(Loop *L, Conn *c)
{
	if (c->send_broken || c->error) {
		/* The peer will not get a whole stream anyway (a send was cut short, or the connection failed): what is
		 * still queued is dropped rather than waited for (a peer that never reads would hold the close forever),
		 * and a send waiting in the kernel is taken back. */
		if (!c->send_in_flight)
			segments_drop(c);
		else if (!c->send_cancel_sent)
			c->writer_cancelled = 1;
	}
	if (c->unsent && !c->error && !c->send_broken)
		return 0;
	if (L->mode == MODE_URING && (c->send_in_flight || c->recv_armed || c->accept_in_flight)) {
		/* A send the queue was dropped under (abort, a cut stream) may wait in the kernel for a peer that never
		 * reads: it is cancelled too, and the fd closes at its CQE. */
		if ((c->recv_armed && !c->recv_cancel_sent) || (c->accept_in_flight && !c->accept_cancel_sent) ||
		    (c->send_in_flight && !c->send_cancel_sent && c->send_broken)) {
			c->want_cancel = 1;
			mark_dirty(L, c);
		}
		return 0;
	}
	return 1;
}

/* Close the fd and retire the Conn; `t` (the closer) gets the outcome. */
static void close_now(Loop *L, Conn *c, Trap *t)
{
	if (c->registered)
		epoll_ctl(L->epfd, EPOLL_CTL_DEL, c->fd, NULL); /* a dup of the fd would otherwise keep it in the set */
	if (close(c->fd) < 0 && errno != EINTR)
		trap_fail_errno(t, errno);
	else
		trap_done(t, NULL, NULL);
	conn_retire(L, c);
}

/* A parked closer goes on once the Conn may close. */
static void protocol_closed(Loop *L, Conn *c);

static void try_finish_close(Loop *L, Conn *c)
{
	Trap *closer = c->closer;

	if (c->dead || !c->closing || !(closer || c->protocol) || !ready_to_close(L, c))
		return;
	if (c->protocol) {
		protocol_closed(L, c);
		return;
	}
	c->closer = NULL;
	close_now(L, c, closer);
	complete_and_wake(L, closer);
}

/* --- uring: preparing the engine's SQEs (all at flush time, so one enter carries them) --------------------------- */

static struct io_uring_sqe *engine_sqe(Loop *L)
{
	if (iokit_ring_reserve(L->ring, 1) < 0)
		return NULL;
	L->ring->counters.sqes++;
	return io_uring_get_sqe(&L->ring->ring);
}

static void uring_flush(Loop *L, Conn *c)
{
	struct io_uring_sqe *sqe;

	if (c->want_cancel) {
		if (c->recv_armed && !c->recv_cancel_sent) {
			if (!(sqe = engine_sqe(L)))
				return;
			io_uring_prep_cancel64(sqe, ENGINE_UD(c->fd, SQE_RECV, c->gen), 0);
			io_uring_sqe_set_data64(sqe, UD_ENGINE_CANCEL);
			c->recv_cancel_sent = 1;
		}
		if (c->accept_in_flight && !c->accept_cancel_sent) {
			if (!(sqe = engine_sqe(L)))
				return;
			io_uring_prep_cancel64(sqe, ENGINE_UD(c->fd, SQE_ACCEPT, c->gen), 0);
			io_uring_sqe_set_data64(sqe, UD_ENGINE_CANCEL);
			c->accept_cancel_sent = 1;
		}
		/* A send waits in the kernel for room (the peer does not read): a cancelled writer, or the end of the
		 * runtime, takes it back. Its CQE says how much went out (-ECANCELED: none of this send). */
		if (c->send_in_flight && !c->send_cancel_sent && (c->writer_cancelled || L->draining || c->send_broken)) {
			if (!(sqe = engine_sqe(L)))
				return;
			io_uring_prep_cancel64(sqe, ENGINE_UD(c->fd, SQE_SEND, c->gen), 0);
			io_uring_sqe_set_data64(sqe, UD_ENGINE_CANCEL);
			c->send_cancel_sent = 1;
		}
		c->want_cancel = 0;
	}
	if (c->want_recv && !c->recv_armed && !c->closing && !c->reading_paused) {
		if (!(sqe = engine_sqe(L)))
			return;
		io_uring_prep_recv_multishot(sqe, c->fd, NULL, 0, 0);
		sqe->flags |= IOSQE_BUFFER_SELECT;
		sqe->buf_group = RECV_BUFFER_GROUP;
		io_uring_sqe_set_data64(sqe, ENGINE_UD(c->fd, SQE_RECV, c->gen));
		c->recv_armed = 1;
		c->recv_cancel_sent = 0;
		L->in_flight++;
	}
	c->want_recv = 0;
	if (c->want_accept && !c->accept_in_flight) {
		if (!(sqe = engine_sqe(L)))
			return;
		c->accept_multishot = (L->ring->features & IOKIT_FEATURE_MULTISHOT_ACCEPT) != 0;
		if (c->accept_multishot)
			io_uring_prep_multishot_accept(sqe, c->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		else
			io_uring_prep_accept(sqe, c->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		io_uring_sqe_set_data64(sqe, ENGINE_UD(c->fd, SQE_ACCEPT, c->gen));
		c->accept_in_flight = 1;
		c->accept_cancel_sent = 0;
		L->in_flight++;
	}
	c->want_accept = 0;
	if (c->unsent && !c->send_in_flight && !c->error && !L->draining) {
		int count;

		if (!(sqe = engine_sqe(L)))
			return;
		count = fill_iov(c);
		if (count < 0) {
			fail_conn(L, c, ENOMEM);
			return;
		}
		if (fault_roll(L, L->faults.short_transfer)) {
			L->faults.shorts++;
			io_uring_prep_send(sqe, c->fd, c->iov[0].iov_base, 1, MSG_NOSIGNAL); /* one byte; the rest after */
			count = 1;
		} else if (count == 1) {
			io_uring_prep_send(sqe, c->fd, c->iov[0].iov_base, c->iov[0].iov_len, MSG_NOSIGNAL);
		} else {
			memset(&c->msg, 0, sizeof c->msg);
			c->msg.msg_iov = c->iov;
			c->msg.msg_iovlen = (size_t)count;
			io_uring_prep_sendmsg(sqe, c->fd, &c->msg, MSG_NOSIGNAL);
		}
		io_uring_sqe_set_data64(sqe, ENGINE_UD(c->fd, SQE_SEND, c->gen));
		c->send_in_flight = 1;
		c->send_cancel_sent = 0;
		c->send_segments = count;
		L->in_flight++;
		L->sends++;
	}
}

static int flush_needed(const Loop *L, const Conn *c)
{
	if (c->dead)
		return 0;
	if (L->mode == MODE_EPOLL)
		return c->unsent && !c->error;
	return c->want_cancel || c->want_recv || c->want_accept || (c->unsent && !c->send_in_flight && !c->error);
}

/* Before each wait: every Conn that queued something gets its syscall (epoll) or SQE (uring). Conns whose SQEs found
 * no room stay on the list for the next turn. */
static void protocol_resume_input(Loop *L, Conn *c);
static int epoll_try_recv(Loop *L, Conn *c, Trap *t);

static void flush_all(Loop *L)
{
	Conn *c = L->dirty, *keep = NULL;

	L->dirty = NULL;
	while (c) {
		Conn *next = c->next_dirty;

		c->dirty = 0;
		if (!c->dead && c->want_read) {
			c->want_read = 0;
			protocol_resume_input(L, c); /* resume_reading(): what waited, then the socket again */
		}
		if (!c->dead && c->retry_reader) {
			Trap *reader = c->reader;

			c->retry_reader = 0;
			if (reader && (serve_from_queue(c, reader) || (L->mode == MODE_EPOLL && epoll_try_recv(L, c, reader)))) {
				c->reader = NULL;
				complete_and_wake(L, reader);
			} else if (reader && L->mode == MODE_URING && !c->recv_armed) {
				c->want_recv = 1;
			}
		}
		if (c->dead) {
			/* buried at the end of the turn */
		} else if (L->mode == MODE_EPOLL) {
			epoll_flush(L, c); /* may fail the Conn and wake its tasks */
			if (!c->dead && c->unsent && !c->error && epoll_register(L, c) < 0)
				fail_conn(L, c, errno ? errno : EBADF);
			if (!c->dead)
				after_send_progress(L, c);
			if (!c->dead)
				try_finish_close(L, c);
		} else {
			uring_flush(L, c);
			if (flush_needed(L, c)) { /* no room in the SQ: next turn */
				c->dirty = 1;
				c->next_dirty = keep;
				keep = c;
			}
		}
		c = next;
	}
	while (keep) {
		Conn *next = keep->next_dirty;

		keep->dirty = 0;
		mark_dirty(L, keep);
		keep = next;
	}
}

/* --- starting a trap ---------------------------------------------------------------------------------------------- */

/* uring, a large mutable buffer of which the kernel took `already` bytes at once: the rest is sent from where it is,
 * pinned, and the sender is parked until the kernel has sent it all (it may reuse its buffer when sendall returns).
 * Returns 0 (parked) or 1 (failed, done). */
static int send_pinned(Loop *L, Conn *c, Trap *t, TaskBase *task, Py_ssize_t already)
{
	Py_ssize_t len = t->view.len;

	if (enqueue_pinned(c, &t->view, already) < 0) {
		trap_fail_errno(t, ENOMEM);
		set_bytes_sent(t->error, already);
		return 1;
	}
	mark_dirty(L, c);
	c->writer_start = c->enqueued_total - len;
	c->writer_len = len;
	c->writer_pinned = 1;
	park(&c->writer, t, task);
	return 0;
}

/* An injected reset: the connection is shut down both ways, as after a peer's RST, and the op fails. 1: injected. */
static int fault_reset(Loop *L, Conn *c, Trap *t)
{
	if (!fault_roll(L, L->faults.reset))
		return 0;
	L->faults.resets++;
	shutdown(c->fd, SHUT_RDWR);
	c->error = ECONNRESET;
	trap_fail_errno(t, ECONNRESET);
	return 1;
}

/* Try the accept now (epoll). 1: done (result or error set), 0: would block. */
static int epoll_try_accept(Trap *t)
{
	for (;;) {
		int fd = accept4(t->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd >= 0) {
			trap_done(t, PyLong_FromLong(fd), NULL);
			return 1;
		}
		if (errno == EINTR || errno == ECONNABORTED)
			continue;
		if (errno == EAGAIN)
			return 0;
		trap_fail_errno(t, errno);
		return 1;
	}
}

/* Try the receive now (epoll), into the loop's scratch buffer or the caller's. 1: done, 0: would block. */
static int epoll_try_recv(Loop *L, Conn *c, Trap *t)
{
	int one_byte;

	if (c->rq_len)
		return serve_from_queue(c, t); /* bytes taken from the socket earlier come first: the order is the stream's */
	one_byte = t->kind != T_WAIT_READABLE && fault_roll(L, L->faults.short_transfer);
	if (one_byte)
		L->faults.shorts++;
	for (;;) {
		ssize_t n;

		if (t->kind == T_RECV_INTO)
			n = recv(c->fd, t->view.buf, one_byte ? 1 : (size_t)t->view.len, 0);
		else if (t->kind == T_RECEIVE)
			n = recv(c->fd, L->scratch,
				 one_byte ? 1 : (size_t)(t->size < SCRATCH_BYTES ? t->size : SCRATCH_BYTES), 0);
		else
			n = recv(c->fd, L->scratch, 1, MSG_PEEK);
		if (n > 0) {
			if (t->kind == T_RECV_INTO)
				trap_done(t, PyLong_FromSsize_t(n), NULL);
			else if (t->kind == T_RECEIVE)
				give_to_reader(t, L->scratch, n);
			else
				trap_done(t, NULL, NULL);
			return 1;
		}
		if (n == 0) {
			c->eof = 1;
			return serve_from_queue(c, t);
		}
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN)
			return 0;
		c->error = errno;
		return serve_from_queue(c, t);
	}
}

/* Start `t` for `task`. Returns 1 if it finished at once (the task goes on), 0 if the task is parked on it. */
static int start_trap(Loop *L, TaskBase *task, Trap *t)
{
	Conn *c;

	L->traps++;
	if (task->cancel_pending && t->kind != T_CLOSE) {
		trap_fail_cancelled(t);
		return 1;
	}
	c = conn_for(L, t->fd);
	if (!c) {
		trap_fail_errno(t, errno);
		return 1;
	}
	if (c->closing && t->kind != T_CLOSE) {
		trap_fail_errno(t, EBADF);
		return 1;
	}
	switch (t->kind) {
	case T_RECEIVE:
	case T_RECV_INTO:
	case T_WAIT_READABLE:
		if (c->reader) {
			trap_done(t, NULL, PyObject_CallFunction(PyExc_RuntimeError, "s",
				  "another task is already receiving on this socket"));
			return 1;
		}
		if (t->kind != T_WAIT_READABLE && fault_reset(L, c, t))
			return 1;
		if (fault_roll(L, L->faults.eagain)) {
			/* "Not ready": park even if data is there; the flush tries again (try, then wait). */
			L->faults.eagains++;
			c->retry_reader = 1;
			mark_dirty(L, c);
			if (L->mode == MODE_EPOLL && epoll_register(L, c) < 0) {
				trap_fail_errno(t, errno);
				return 1;
			}
			park(&c->reader, t, task);
			return 0;
		}
		if (serve_from_queue(c, t))
			return 1;
		if (L->mode == MODE_EPOLL) {
			int err;
			ssize_t n;

			if (t->kind != T_WAIT_READABLE && fault_roll(L, L->faults.cancel_race) &&
			    (n = recv(c->fd, L->scratch, SCRATCH_BYTES, 0)) > 0) {
				/* As if a cancel had won just after the syscall moved these bytes: they must not be lost,
				 * so they wait in the queue, and the flush serves the reader from there. */
				L->faults.cancel_races++;
				if (rq_append(c, L->scratch, n) < 0) {
					trap_fail_errno(t, ENOMEM);
					return 1;
				}
				c->retry_reader = 1;
				mark_dirty(L, c);
				park(&c->reader, t, task);
				return 0;
			}
			if (epoll_try_recv(L, c, t))
				return 1;
			if ((err = epoll_register(L, c)) < 0) {
				trap_fail_errno(t, -err);
				return 1;
			}
		} else if (!c->recv_armed) {
			c->want_recv = 1;
			mark_dirty(L, c);
		}
		park(&c->reader, t, task);
		return 0;
	case T_SEND:
		if (fault_reset(L, c, t)) {
			set_bytes_sent(t->error, 0);
			return 1;
		}
		if (c->error || c->shut_write) {
			trap_fail_errno(t, c->error ? c->error : EPIPE);
			set_bytes_sent(t->error, 0);
			return 1;
		}
		if (t->view.len >= PIN_AT && !c->unsent && !c->send_in_flight && !L->faults.on) {
			/* Large, and nothing queued before it: the syscall now (what uvloop does). On uring too: a send SQE
			 * would make the same copy into the socket, one turn later, and the sender would wait for its CQE
			 * (a pipelining peer's next message would then wait a turn). Only what the kernel did not take is
			 * queued: copied on epoll, pinned on uring. */
			ssize_t n = send(c->fd, t->view.buf, (size_t)t->view.len, MSG_NOSIGNAL | MSG_DONTWAIT);

			L->sends++;
			if (n < 0 && errno != EAGAIN && errno != EINTR) {
				c->error = errno;
				trap_fail_errno(t, errno);
				set_bytes_sent(t->error, 0);
				return 1;
			}
			if (n < 0)
				n = 0;
			c->enqueued_total += n;
			c->sent_total += n;
			if (n == t->view.len) {
				trap_done(t, NULL, NULL);
				return 1;
			}
			if (L->mode == MODE_URING && !PyBytes_CheckExact(t->view.obj) && !c->writer)
				return send_pinned(L, c, t, task, n);
			if (enqueue(c, t->view.obj, (char *)t->view.buf + n, t->view.len - n) < 0) {
				trap_fail_errno(t, ENOMEM);
				set_bytes_sent(t->error, n);
				return 1;
			}
		} else if (L->mode == MODE_URING && t->view.len >= PIN_AT && !PyBytes_CheckExact(t->view.obj) &&
			   !c->writer) {
			return send_pinned(L, c, t, task, 0);
		} else if (enqueue(c, t->view.obj, t->view.buf, t->view.len) < 0) {
			trap_fail_errno(t, ENOMEM);
			set_bytes_sent(t->error, 0);
			return 1;
		}
		mark_dirty(L, c);
		if (c->unsent <= SEND_HIGH_WATER) {
			trap_done(t, NULL, NULL);
			return 1;
		}
		if (c->writer) {
			trap_done(t, NULL, PyObject_CallFunction(PyExc_RuntimeError, "s",
				  "another task is already waiting to send on this socket"));
			return 1;
		}
		c->writer_start = c->enqueued_total - t->view.len;
		c->writer_len = t->view.len;
		trap_release_view(t);
		park(&c->writer, t, task);
		return 0;
	case T_ACCEPT:
		if (L->mode == MODE_EPOLL) {
			int err;

			if (!c->acceptor && epoll_try_accept(t))
				return 1;
			if ((err = epoll_register(L, c)) < 0) {
				trap_fail_errno(t, -err);
				return 1;
			}
		} else if (c->accepted_len && !c->acceptor) {
			trap_done(t, PyLong_FromLong(accepted_pop(c)), NULL);
			if (!c->accept_in_flight && !c->closing) {
				c->want_accept = 1; /* the backlog was full: the kernel's accepting had stopped */
				mark_dirty(L, c);
			}
			return 1;
		} else if (!c->accept_in_flight) {
			c->want_accept = 1; /* else the request in flight (an earlier acceptor's) serves this one */
			mark_dirty(L, c);
		}
		acceptor_push(c, t, task);
		return 0;
	case T_SHUTDOWN:
		c->shut_write = 1;
		if ((c->unsent || c->send_in_flight) && !c->error) {
			/* After the queued bytes: after_send_progress() sends it once the queue is empty. */
			trap_done(t, NULL, NULL);
			return 1;
		}
		c->shut_done = 1;
		if (shutdown(c->fd, SHUT_WR) < 0 && errno != ENOTCONN)
			trap_fail_errno(t, errno);
		else
			trap_done(t, NULL, NULL);
		return 1;
	case T_CLOSE: {
		Trap *reader = c->reader, *acceptor;

		c->closing = 1;
		c->reader = NULL;
		if (reader) {
			trap_fail_errno(reader, EBADF);
			schedule(L, reader);
		}
		while ((acceptor = acceptor_pop(c))) {
			trap_fail_errno(acceptor, EBADF);
			schedule(L, acceptor);
		}
		if (ready_to_close(L, c)) {
			close_now(L, c, t);
			return 1;
		}
		park(&c->closer, t, task);
		return 0;
	}
	}
	trap_fail_errno(t, EINVAL);
	return 1;
}

/* --- running a task ------------------------------------------------------------------------------------------------ */

static PyObject *set_current(PyObject *task)
{
	PyObject *previous = current;

	Py_XINCREF(task);
	current = task;
	return previous;
}

static void restore_current(PyObject *previous)
{
	PyObject *mine = current;

	current = previous;
	Py_XDECREF(mine);
}

/* Call driver._finish_task(task, result, error). */
static void finish(Loop *L, TaskBase *task, PyObject *result, PyObject *error)
{
	PyObject *args[3] = {(PyObject *)task, result ? result : Py_None, error ? error : Py_None};
	PyObject *r = PyObject_Vectorcall(L->finish_task, args, 3, NULL);

	if (!r)
		note_error(L);
	Py_XDECREF(r);
}

/*
 * Resume `task` with `value` (or throw `exc` into it) and keep it running through every trap that finishes at once;
 * stop when it parks on one, yields a trap the engine does not know (handed to driver._handle), or ends.
 */
static void run_task(Loop *L, TaskBase *task, PyObject *value, PyObject *exc)
{
	PyObject *previous = set_current((PyObject *)task);

	Py_INCREF(task);
	for (;;) {
		PyObject *out = NULL;
		PySendResult r;

		L->resumes++;
		if (!task->coro) {
			PyErr_SetString(PyExc_RuntimeError, "task has no coroutine");
			r = PYGEN_ERROR;
		} else if (exc) {
			out = PyObject_CallMethod(task->coro, "throw", "O", exc);
			exc = NULL;
			if (out) {
				r = PYGEN_NEXT;
			} else if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
				PyObject *type, *val, *tb;

				PyErr_Fetch(&type, &val, &tb);
				PyErr_NormalizeException(&type, &val, &tb);
				out = val ? PyObject_GetAttrString(val, "value") : Py_NewRef(Py_None);
				Py_XDECREF(type);
				Py_XDECREF(val);
				Py_XDECREF(tb);
				r = PYGEN_RETURN;
			} else {
				r = PYGEN_ERROR;
			}
		} else {
			r = PyIter_Send(task->coro, value, &out);
		}
		value = Py_None;
		if (r == PYGEN_RETURN) {
			finish(L, task, out, NULL);
			Py_XDECREF(out);
			break;
		}
		if (r == PYGEN_ERROR) {
			PyObject *type, *val, *tb;

			PyErr_Fetch(&type, &val, &tb);
			PyErr_NormalizeException(&type, &val, &tb);
			if (val && tb)
				PyException_SetTraceback(val, tb);
			finish(L, task, NULL, val);
			Py_XDECREF(type);
			Py_XDECREF(val);
			Py_XDECREF(tb);
			break;
		}
		if (Py_IS_TYPE(out, &TrapType)) {
			int done = start_trap(L, task, (Trap *)out);

			Py_DECREF(out);
			if (done)
				continue;
			break;
		}
		{
			PyObject *args[2] = {(PyObject *)task, out};
			PyObject *handled = PyObject_Vectorcall(L->handle, args, 2, NULL);

			Py_DECREF(out);
			if (!handled)
				note_error(L);
			Py_XDECREF(handled);
		}
		break;
	}
	Py_DECREF(task);
	restore_current(previous);
}

/* --- completions ------------------------------------------------------------------------------------------------- */

static void protocol_uring_recv(Loop *L, Conn *c, const struct io_uring_cqe *cqe, int more);

static void uring_recv_completion(Loop *L, Conn *c, const struct io_uring_cqe *cqe, int more)
{
	Trap *reader = c->reader;
	int res = cqe->res;

	if (c->protocol) {
		protocol_uring_recv(L, c, cqe, more);
		return;
	}
	if (!more)
		c->recv_armed = 0;
	if (res > 0) {
		unsigned id = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
		const char *data = L->ring->buffers + (size_t)id * L->ring->buffer_size;

		if (!c->closing) {
			Py_ssize_t used = 0;

			/* Copy out, give the buffer back at once, then wake the reader (which may run a while). */
			if (reader && c->rq_len) {
				/* Older bytes wait in the queue (an injected EAGAIN parked the reader over them): these go
				 * behind them, and the reader is served from the queue, in order. */
				c->reader = NULL;
				if (rq_append(c, data, res) < 0)
					c->error = ENOMEM;
				serve_from_queue(c, reader);
				used = res;
			} else if (reader && fault_roll(L, L->faults.cancel_race)) {
				/* As if a cancel had won the race with this completion: the bytes go back to the queue, the
				 * reader stays parked and the flush serves it from there. Not one byte may go missing. */
				L->faults.cancel_races++;
				c->retry_reader = 1;
				mark_dirty(L, c);
				reader = NULL;
			} else if (reader) {
				int one_byte = fault_roll(L, L->faults.short_transfer);

				L->faults.shorts += one_byte;
				c->reader = NULL;
				used = give_to_reader(reader, data, one_byte ? 1 : res); /* the rest waits in the queue */
				if (used < 0)
					used = 0;
			}
			if (used < res && rq_append(c, data + used, res - used) < 0)
				c->error = ENOMEM;
			if (more && !reader && c->rq_len >= RECV_HIGH_WATER && !c->recv_cancel_sent) {
				c->want_cancel = 1; /* nobody reads: stop until somebody does (backpressure) */
				mark_dirty(L, c);
			}
		}
		iokit_ring_return_buffer(L->ring, id);
		if (reader && !c->reader)
			complete_and_wake(L, reader);
		return;
	}
	if (res == 0)
		c->eof = 1;
	else if (res != -ENOBUFS && res != -ECANCELED)
		c->error = -res;
	/* -ENOBUFS (every buffer lent) and our own cancel end the request without ending the stream. */
	if (reader && !c->recv_armed) {
		if (serve_from_queue(c, reader)) {
			c->reader = NULL;
			complete_and_wake(L, reader);
		} else if (!c->closing) {
			c->want_recv = 1;
			mark_dirty(L, c);
		}
	}
}

/*
 * A listener's accept CQE. The multishot accept (5.19) goes on making connections while it has F_MORE: each goes to
 * the oldest acceptor, or waits in `accepted` for the next one; past ACCEPT_BACKLOG waiting the accept is cancelled,
 * and further connections wait in the kernel's listen backlog (backpressure, as for unread bytes). The single-shot
 * accept (older kernels) asks again while acceptors wait.
 */
#define ACCEPT_BACKLOG 64

static void uring_accept_completion(Loop *L, Conn *c, int res, int more)
{
	Trap *acceptor = c->acceptor;

	if (!more)
		c->accept_in_flight = 0;
	if (res >= 0 && (c->closing || (!acceptor && !c->accept_multishot))) {
		close(res); /* the accept was given up (a close, or the last acceptor cancelled): nobody will take it */
	} else if (res >= 0 && !acceptor) {
		if (accepted_push(c, res) == 0 && c->accepted_len >= ACCEPT_BACKLOG && more && !c->accept_cancel_sent) {
			c->want_cancel = 1;
			mark_dirty(L, c);
		}
	} else if (acceptor && !(res == -ECANCELED && c->accept_cancel_sent)) {
		acceptor_pop(c);
		if (res >= 0)
			trap_done(acceptor, PyLong_FromLong(res), NULL);
		else
			trap_fail_errno(acceptor, -res);
		complete_and_wake(L, acceptor);
	}
	if (!c->dead && !c->accept_in_flight && c->acceptor && !c->closing) {
		c->want_accept = 1; /* tasks still wait to accept (after our cancel, too: meant for one that left) */
		mark_dirty(L, c);
	}
}

static void uring_completion(void *engine, const struct io_uring_cqe *cqe)
{
	Loop *L = engine;
	uint64_t ud = cqe->user_data;
	int fd = UD_FD(ud), kind = UD_KIND(ud), res = cqe->res;
	int more = (cqe->flags & IORING_CQE_F_MORE) != 0;
	Conn *c = conn_get(L, fd);

	L->completions++;
	if (!more)
		L->in_flight--;
	if (!c || c->gen != UD_GEN(ud)) {
		/* Cannot happen while close() waits for every final CQE; counted, and the buffer goes back. */
		L->stale++;
		if (kind == SQE_ACCEPT && res >= 0)
			close(res);
		if (cqe->flags & IORING_CQE_F_BUFFER)
			iokit_ring_return_buffer(L->ring, cqe->flags >> IORING_CQE_BUFFER_SHIFT);
		return;
	}
	switch (kind) {
	case SQE_RECV:
		uring_recv_completion(L, c, cqe, more);
		break;
	case SQE_SEND:
		c->send_in_flight = 0;
		c->send_segments = 0;
		if (res == -ECANCELED && c->send_cancel_sent)
			res = 0; /* taken back by us: nothing of it went out, and the connection is fine */
		if (L->draining || (c->closing && c->send_broken)) {
			segments_drop(c);
			break;
		}
		if (res >= 0) {
			consume(c, res);
			if (c->writer && c->writer_cancelled) {
				Trap *writer = c->writer;

				c->writer = NULL;
				cut_writer(c, writer);
				complete_and_wake(L, writer);
			}
			if (!c->dead && c->unsent)
				mark_dirty(L, c);
		} else {
			fail_conn(L, c, -res);
		}
		if (!c->dead)
			after_send_progress(L, c);
		break;
	case SQE_ACCEPT:
		uring_accept_completion(L, c, res, more);
		break;
	}
	if (!c->dead)
		try_finish_close(L, c);
}

/* --- protocols --------------------------------------------------------------------------------------------------- */

static void protocol_abort(Loop *L, Conn *c);

/* Call a protocol method (NULL: the protocol has none) as the Conn's owner task. An exception it raises is reported
 * (sys.unraisablehook) and ends the connection: connection_lost() gets it, as asyncio does. Returns the result. */
static PyObject *protocol_call_method(Loop *L, Conn *c, PyObject *method, PyObject *arg)
{
	PyObject *previous, *result;

	if (!method)
		return NULL;
	previous = set_current(c->owner);
	Py_INCREF(method);
	L->callbacks++;
	result = arg ? PyObject_CallOneArg(method, arg) : PyObject_CallNoArgs(method);
	restore_current(previous);
	if (!result)
		protocol_callback_failed(L, c, method);
	Py_DECREF(method);
	return result;
}

/* The exception set now came from the protocol (a callback, or looking one up): report it (sys.unraisablehook, with
 * `where`) and end the connection, connection_lost() getting it. */
static void protocol_callback_failed(Loop *L, Conn *c, PyObject *where)
{
	PyObject *type, *value, *tb;

	PyErr_Fetch(&type, &value, &tb);
	PyErr_NormalizeException(&type, &value, &tb);
	if (value && tb)
		PyException_SetTraceback(value, tb);
	if (!c->dead && !c->lost_error && value)
		c->lost_error = Py_NewRef(value);
	PyErr_Restore(type, value, tb);
	PyErr_WriteUnraisable(where);
	if (!c->dead)
		protocol_abort(L, c);
}

static PyObject *optional_method(PyObject *protocol, const char *name);

/* Call the protocol's method `name` (one it had when attached: `has`), as protocol_call_method does; a lookup that
 * fails otherwise than by the method's absence is the protocol's failure too. */
static PyObject *protocol_call_named(Loop *L, Conn *c, int has, const char *name, PyObject *arg)
{
	PyObject *protocol = c->protocol, *method, *result;

	if (!has || !protocol)
		return NULL;
	Py_INCREF(protocol);
	method = optional_method(protocol, name);
	if (method) {
		result = protocol_call_method(L, c, method, arg);
		Py_DECREF(method);
	} else {
		result = NULL;
		if (PyErr_Occurred())
			protocol_callback_failed(L, c, protocol);
	}
	Py_DECREF(protocol);
	return result;
}

/* data_received(bytes); `bytes` is stolen (NULL: no memory for it, which ends the connection). */
static void protocol_data(Loop *L, Conn *c, PyObject *bytes)
{
	if (!bytes) {
		PyErr_Clear();
		protocol_fail(L, c, ENOMEM);
		return;
	}
	Py_XDECREF(protocol_call_method(L, c, c->on_data, bytes));
	Py_DECREF(bytes);
}

/* The peer closed its side: eof_received() says whether to keep the transport open (half-closed); if not, close. */
static void protocol_eof(Loop *L, Conn *c)
{
	PyObject *keep;

	c->eof = 1;
	if (c->closing || c->dead || c->eof_told)
		return;
	c->eof_told = 1;
	keep = protocol_call_named(L, c, c->has_eof, "eof_received", NULL);
	if (!c->dead && !c->closing && !(keep && PyObject_IsTrue(keep) == 1)) {
		c->closing = 1;
		try_finish_close(L, c);
	}
	Py_XDECREF(keep);
}

static void protocol_fail(Loop *L, Conn *c, int err)
{
	if (!c->lost_error && !(c->lost_error = os_error(err)))
		PyErr_Clear();
	if (!c->error)
		c->error = err;
	protocol_abort(L, c);
}

/* Close at once: the queue is dropped (what a send in flight holds stays until its CQE), the fd is closed as soon as
 * no request of ours holds it, and connection_lost() follows. */
static void protocol_abort(Loop *L, Conn *c)
{
	if (c->dead)
		return;
	c->send_broken = 1;
	c->closing = 1;
	try_finish_close(L, c);
}

/* The fd may close: close it, then connection_lost() once, then the bookkeeping callback; the Conn lets go. */
static void protocol_closed(Loop *L, Conn *c)
{
	PyObject *protocol = c->has_lost && c->protocol ? Py_NewRef(c->protocol) : NULL;
	PyObject *closed = c->on_closed, *transport = c->transport, *owner = c->owner;
	PyObject *error = c->lost_error;
	PyObject *previous, *lost, *r;

	if (c->registered)
		epoll_ctl(L->epfd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	c->on_closed = c->transport = c->owner = c->lost_error = NULL;
	conn_retire(L, c);
	protocol_release(c);
	previous = set_current(owner);
	L->callbacks++;
	/* Looked up only now, with the Conn gone: whatever the lookup runs cannot reach this connection again. */
	lost = protocol ? optional_method(protocol, "connection_lost") : NULL;
	if (lost) {
		r = PyObject_CallOneArg(lost, error ? error : Py_None);
		if (!r)
			PyErr_WriteUnraisable(lost);
		Py_XDECREF(r);
	} else if (protocol && PyErr_Occurred()) {
		PyErr_WriteUnraisable(protocol); /* the lookup failed otherwise than by its absence */
	}
	if (closed) {
		r = PyObject_CallOneArg(closed, transport ? transport : Py_None);
		if (!r)
			PyErr_WriteUnraisable(closed);
		Py_XDECREF(r);
	}
	restore_current(previous);
	Py_XDECREF(error);
	Py_XDECREF(lost);
	Py_XDECREF(protocol);
	Py_XDECREF(closed);
	Py_XDECREF(transport);
	Py_XDECREF(owner);
}

/*
 * epoll: read until the socket is empty, or paused. A short read says the socket was empty when it ran, and every
 * later arrival makes a new edge, so it can stop there, saving the recv that would say EAGAIN; not when the event
 * said the peer closed (`peer_closed`: the FIN is already queued, and no new edge will announce it) nor when called
 * without an event (resume_reading), which read until EAGAIN or the end.
 */
static void protocol_epoll_read(Loop *L, Conn *c, int short_read_ends)
{
	/* After the end of stream (a half-open transport), later events still say RDHUP: nothing more to read. */
	while (!c->dead && !c->closing && !c->reading_paused && !c->eof_told) {
		int one_byte = fault_roll(L, L->faults.short_transfer);
		ssize_t n;

		if (fault_roll(L, L->faults.eagain)) {
			/* As if the socket had been empty: the edge is spent, so the flush must read again (want_read). */
			L->faults.eagains++;
			c->want_read = 1;
			mark_dirty(L, c);
			return;
		}
		L->faults.shorts += one_byte;
		n = recv(c->fd, L->scratch, one_byte ? 1 : SCRATCH_BYTES, 0);
		if (n > 0) {
			protocol_data(L, c, PyBytes_FromStringAndSize(L->scratch, n));
			if (short_read_ends && n < SCRATCH_BYTES && !one_byte)
				return;
			continue;
		}
		if (n == 0) {
			protocol_eof(L, c);
			return;
		}
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			protocol_fail(L, c, errno);
		return;
	}
}

static void protocol_uring_recv(Loop *L, Conn *c, const struct io_uring_cqe *cqe, int more)
{
	int res = cqe->res;

	if (!more)
		c->recv_armed = 0;
	if (res > 0) {
		unsigned id = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
		const char *data = L->ring->buffers + (size_t)id * L->ring->buffer_size;
		PyObject *bytes = NULL;

		/* Bytes that come after pause_reading() (the kernel had them before our cancel) wait for resume_reading;
		 * bytes behind some that wait (an injected EAGAIN held them back) wait behind them, for the flush. */
		int held = !c->closing && (c->reading_paused || c->rq_len || fault_roll(L, L->faults.eagain));

		if (held) {
			L->faults.eagains += !c->reading_paused && !c->rq_len;
			if (rq_append(c, data, res) < 0)
				c->error = ENOMEM;
			if (!c->reading_paused) {
				c->want_read = 1;
				mark_dirty(L, c);
			}
		} else if (!c->closing && res > 1 && fault_roll(L, L->faults.short_transfer)) {
			L->faults.shorts++; /* the chunk in two calls: one byte, then the rest */
			if (!(bytes = PyBytes_FromStringAndSize(data, 1)) || rq_append(c, data + 1, res - 1) < 0)
				c->error = ENOMEM;
			c->want_read = 1;
			mark_dirty(L, c);
		} else if (!c->closing) {
			bytes = PyBytes_FromStringAndSize(data, res);
		}
		iokit_ring_return_buffer(L->ring, id); /* copied out: the kernel may have it back before Python runs */
		if (bytes || (!c->closing && !held))
			protocol_data(L, c, bytes);
	} else if (res == 0) {
		/* The end comes after the bytes that wait (paused, or held back): resume_input reports it after them. */
		if (c->rq_len || c->reading_paused)
			c->eof = 1;
		else
			protocol_eof(L, c);
	} else if (res != -ENOBUFS && res != -ECANCELED) {
		protocol_fail(L, c, -res);
	}
	if (!c->dead && !c->recv_armed && !c->closing && !c->reading_paused && !c->eof && !c->error) {
		c->want_recv = 1; /* the kernel stopped it (no buffer left, overflow, our pause): again */
		mark_dirty(L, c);
	}
}

/* resume_reading(): first what arrived while paused, then the socket. */
static void protocol_resume_input(Loop *L, Conn *c)
{
	if (!c->protocol || c->reading_paused || c->closing)
		return;
	if (c->rq_len) {
		PyObject *bytes = PyBytes_FromStringAndSize(c->rq + c->rq_start, c->rq_len);

		c->rq_start = c->rq_len = 0;
		protocol_data(L, c, bytes);
	}
	if (c->dead || c->closing || c->reading_paused)
		return;
	if (c->eof) {
		protocol_eof(L, c);
	} else if (L->mode == MODE_EPOLL) {
		protocol_epoll_read(L, c, 0);
	} else if (!c->recv_armed) {
		c->want_recv = 1;
		mark_dirty(L, c);
	}
}

static void epoll_event(Loop *L, uint64_t data, uint32_t events)
{
	int fd = (int)(uint32_t)data;
	Conn *c = conn_get(L, fd);
	Trap *t;

	if (!c || c->gen != (uint32_t)(data >> 32)) {
		L->stale++;
		return;
	}
	L->completions++;
	if (c->protocol && (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
		protocol_epoll_read(L, c, !(events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)));
	} else if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
		while (!c->dead && (t = c->acceptor) && epoll_try_accept(t)) {
			acceptor_pop(c);
			complete_and_wake(L, t);
		}
		if (!c->dead && (t = c->reader) && fault_roll(L, L->faults.cancel_race)) {
			/* As if a cancel had won against this readiness: the reader stays parked, the flush tries again. */
			L->faults.cancel_races++;
			c->retry_reader = 1;
			mark_dirty(L, c);
		} else if (!c->dead && (t = c->reader) && epoll_try_recv(L, c, t)) {
			c->reader = NULL;
			complete_and_wake(L, t);
		}
	}
	if (!c->dead && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && c->unsent) {
		epoll_flush(L, c);
		if (!c->dead)
			after_send_progress(L, c);
		if (!c->dead)
			try_finish_close(L, c);
	}
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* Loop's Python face                                                                                                */

/* ---------------------------------------------------------------------------------------------------------------- */
/* Transport: the protocol's handle on its connection (asyncio's Transport methods)                                  */

#define DEFAULT_HIGH_WATER (64 * 1024) /* asyncio's defaults */

typedef struct {
	PyObject_HEAD
	PyObject *loop;       /* the Loop (strong) */
	int fd;
	uint32_t gen;
	PyObject *extra;      /* what get_extra_info() answers from */
	int closed_by_user;   /* close() was called: a later write() is the caller's mistake, and says so */
} Transport;

static PyTypeObject TransportType;

/* The Conn behind the transport, or NULL once the connection is gone. */
static Conn *transport_conn(Transport *t)
{
	Conn *c = conn_get((Loop *)t->loop, t->fd);

	return c && c->gen == t->gen && !c->dead && c->protocol ? c : NULL;
}

static void transport_dealloc(Transport *t)
{
	Py_XDECREF(t->loop);
	Py_XDECREF(t->extra);
	PyObject_Free(t);
}

static void check_write_limits(Loop *L, Conn *c)
{
	if (!c->writing_paused && c->unsent > c->high_water) {
		c->writing_paused = 1;
		Py_XDECREF(protocol_call_named(L, c, c->has_pause, "pause_writing", NULL));
	} else if (c->writing_paused && c->unsent <= c->low_water) {
		c->writing_paused = 0;
		Py_XDECREF(protocol_call_named(L, c, c->has_resume, "resume_writing", NULL));
	}
}

/* write(data): queued; the turn's flush sends it (with the connection's other writes of the turn, in one send). Past
 * the high-water mark the protocol's pause_writing() is called, and resume_writing() once below the low one. After
 * the connection is lost, writes are dropped (asyncio does so too); after close() they are an error. */
static PyObject *transport_write(Transport *t, PyObject *data)
{
	Loop *L = (Loop *)t->loop;
	Conn *c = transport_conn(t);
	Py_buffer view;
	int failed;

	if (t->closed_by_user) {
		PyErr_SetString(PyExc_RuntimeError, "write() after close()");
		return NULL;
	}
	if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
		return NULL;
	if (!c || c->error || c->send_broken || c->shut_write) {
		PyBuffer_Release(&view);
		Py_RETURN_NONE;
	}
	failed = enqueue(c, data, view.buf, view.len) < 0;
	PyBuffer_Release(&view);
	if (failed)
		return PyErr_NoMemory();
	mark_dirty(L, c);
	check_write_limits(L, c);
	Py_RETURN_NONE;
}

static PyObject *transport_writelines(Transport *t, PyObject *iterable)
{
	PyObject *iterator = PyObject_GetIter(iterable), *item;

	if (!iterator)
		return NULL;
	while ((item = PyIter_Next(iterator))) {
		PyObject *r = transport_write(t, item);

		Py_DECREF(item);
		if (!r) {
			Py_DECREF(iterator);
			return NULL;
		}
		Py_DECREF(r);
	}
	Py_DECREF(iterator);
	if (PyErr_Occurred())
		return NULL;
	Py_RETURN_NONE;
}

/* close(): the queued bytes leave first, then the fd closes and connection_lost(None) is called. */
static PyObject *transport_close(Transport *t, PyObject *unused)
{
	Conn *c = transport_conn(t);

	(void)unused;
	t->closed_by_user = 1;
	if (c && !c->closing) {
		c->closing = 1;
		try_finish_close((Loop *)t->loop, c);
	}
	Py_RETURN_NONE;
}

/* abort(): close now; what is queued is dropped. */
static PyObject *transport_abort(Transport *t, PyObject *unused)
{
	Conn *c = transport_conn(t);

	(void)unused;
	if (c)
		protocol_abort((Loop *)t->loop, c);
	Py_RETURN_NONE;
}

/* write_eof(): end of stream to the peer once the queue is empty; reading goes on. */
static PyObject *transport_write_eof(Transport *t, PyObject *unused)
{
	Conn *c = transport_conn(t);

	(void)unused;
	if (c && !c->shut_write) {
		c->shut_write = 1;
		after_send_progress((Loop *)t->loop, c);
	}
	Py_RETURN_NONE;
}

static PyObject *transport_can_write_eof(Transport *t, PyObject *unused)
{
	(void)t;
	(void)unused;
	Py_RETURN_TRUE;
}

static PyObject *transport_is_closing(Transport *t, PyObject *unused)
{
	Conn *c = transport_conn(t);

	(void)unused;
	return PyBool_FromLong(!c || c->closing);
}

static PyObject *transport_pause_reading(Transport *t, PyObject *unused)
{
	Loop *L = (Loop *)t->loop;
	Conn *c = transport_conn(t);

	(void)unused;
	if (c && !c->closing && !c->reading_paused) {
		c->reading_paused = 1;
		if (L->mode == MODE_URING && c->recv_armed && !c->recv_cancel_sent) {
			c->want_cancel = 1; /* the kernel keeps what comes next: backpressure reaches the peer */
			mark_dirty(L, c);
		}
	}
	Py_RETURN_NONE;
}

static PyObject *transport_resume_reading(Transport *t, PyObject *unused)
{
	Loop *L = (Loop *)t->loop;
	Conn *c = transport_conn(t);

	(void)unused;
	if (c && !c->closing && c->reading_paused) {
		c->reading_paused = 0;
		c->want_read = 1; /* at the turn's flush: not from inside the caller's data_received */
		mark_dirty(L, c);
	}
	Py_RETURN_NONE;
}

static PyObject *transport_is_reading(Transport *t, PyObject *unused)
{
	Conn *c = transport_conn(t);

	(void)unused;
	return PyBool_FromLong(c && !c->closing && !c->reading_paused);
}

static PyObject *transport_get_write_buffer_size(Transport *t, PyObject *unused)
{
	Conn *c = transport_conn(t);

	(void)unused;
	return PyLong_FromSsize_t(c ? c->unsent : 0);
}

static PyObject *transport_get_write_buffer_limits(Transport *t, PyObject *unused)
{
	Conn *c = transport_conn(t);

	(void)unused;
	return Py_BuildValue("(nn)", c ? c->low_water : 0, c ? c->high_water : DEFAULT_HIGH_WATER);
}

/* set_write_buffer_limits(high=None, low=None), with asyncio's defaults: 64 KiB, and low = high / 4. */
static PyObject *transport_set_write_buffer_limits(Transport *t, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = {"high", "low", NULL};
	PyObject *high_obj = Py_None, *low_obj = Py_None;
	Py_ssize_t high, low;
	Conn *c = transport_conn(t);

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "|OO", kwlist, &high_obj, &low_obj))
		return NULL;
	low = low_obj == Py_None ? -1 : PyLong_AsSsize_t(low_obj);
	if (low == -1 && PyErr_Occurred())
		return NULL;
	high = high_obj == Py_None ? (low < 0 ? DEFAULT_HIGH_WATER : 4 * low) : PyLong_AsSsize_t(high_obj);
	if (high == -1 && PyErr_Occurred())
		return NULL;
	if (low < 0)
		low = high / 4;
	if (!(high >= low && low >= 0)) {
		PyErr_Format(PyExc_ValueError, "high (%zd) must be >= low (%zd) must be >= 0", high, low);
		return NULL;
	}
	if (c) {
		c->high_water = high;
		c->low_water = low;
		check_write_limits((Loop *)t->loop, c);
	}
	Py_RETURN_NONE;
}

static PyObject *transport_get_extra_info(Transport *t, PyObject *args)
{
	PyObject *name, *fallback = Py_None, *value;

	if (!PyArg_ParseTuple(args, "O|O", &name, &fallback))
		return NULL;
	value = t->extra ? PyDict_GetItemWithError(t->extra, name) : NULL;
	if (!value && PyErr_Occurred())
		return NULL;
	return Py_NewRef(value ? value : fallback);
}

static PyObject *transport_fileno(Transport *t, PyObject *unused)
{
	(void)unused;
	return PyLong_FromLong(transport_conn(t) ? t->fd : -1);
}

static PyMethodDef transport_methods[] = {
	{"write", (PyCFunction)transport_write, METH_O, "write(data): queue data to send"},
	{"writelines", (PyCFunction)transport_writelines, METH_O, "writelines(iterable): write each"},
	{"write_eof", (PyCFunction)transport_write_eof, METH_NOARGS, "end of stream to the peer, after the queue"},
	{"can_write_eof", (PyCFunction)transport_can_write_eof, METH_NOARGS, "True: a TCP stream can half-close"},
	{"close", (PyCFunction)transport_close, METH_NOARGS, "close once the queue has left; connection_lost follows"},
	{"abort", (PyCFunction)transport_abort, METH_NOARGS, "close now, dropping the queue"},
	{"is_closing", (PyCFunction)transport_is_closing, METH_NOARGS, NULL},
	{"pause_reading", (PyCFunction)transport_pause_reading, METH_NOARGS, NULL},
	{"resume_reading", (PyCFunction)transport_resume_reading, METH_NOARGS, NULL},
	{"is_reading", (PyCFunction)transport_is_reading, METH_NOARGS, NULL},
	{"get_write_buffer_size", (PyCFunction)transport_get_write_buffer_size, METH_NOARGS, NULL},
	{"get_write_buffer_limits", (PyCFunction)transport_get_write_buffer_limits, METH_NOARGS, "-> (low, high)"},
	{"set_write_buffer_limits", (PyCFunction)(void (*)(void))transport_set_write_buffer_limits,
	 METH_VARARGS | METH_KEYWORDS, "set_write_buffer_limits(high=None, low=None)"},
	{"get_extra_info", (PyCFunction)transport_get_extra_info, METH_VARARGS, "get_extra_info(name, default=None)"},
	{"fileno", (PyCFunction)transport_fileno, METH_NOARGS, "the socket's fd, -1 once closed"},
	{NULL},
};

static PyTypeObject TransportType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "iokit._engine.Transport",
	.tp_basicsize = sizeof(Transport),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "A connection driven by the native engine, as a protocol sees it (asyncio's Transport methods).",
	.tp_dealloc = (destructor)transport_dealloc,
	.tp_methods = transport_methods,
};

static PyObject *optional_method(PyObject *protocol, const char *name)
{
	PyObject *method = PyObject_GetAttrString(protocol, name);

	if (!method && PyErr_ExceptionMatches(PyExc_AttributeError))
		PyErr_Clear();
	return method;
}

static int has_method(PyObject *protocol, const char *name)
{
	PyObject *method = optional_method(protocol, name);

	PyErr_Clear(); /* any other error of the lookup is met again when it is called */
	Py_XDECREF(method);
	return method != NULL;
}

/* attach_protocol(fd, protocol, owner, extra=None, on_closed=None): from now on the engine drives the connection and
 * calls the protocol: connection_made(transport) now, then data_received(bytes) per chunk, eof_received(),
 * pause_writing()/resume_writing(), and connection_lost(exc) once the fd is closed; on_closed(transport) after that. */
static PyObject *loop_attach_protocol(PyObject *self, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = {"fd", "protocol", "owner", "extra", "on_closed", NULL};
	Loop *L = (Loop *)self;
	PyObject *protocol, *owner, *extra = Py_None, *on_closed = Py_None;
	Transport *t;
	Conn *c;
	int fd;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOO|OO", kwlist, &fd, &protocol, &owner, &extra, &on_closed))
		return NULL;
	if (fd < 0)
		return PyErr_Format(PyExc_ValueError, "fd must be >= 0, got %d", fd);
	c = conn_for(L, fd);
	if (!c)
		return PyErr_SetFromErrno(PyExc_OSError);
	if (c->protocol || c->reader || c->writer || c->acceptor || c->closing) {
		PyErr_SetString(PyExc_RuntimeError, "this socket is in use by a stream or another protocol");
		return NULL;
	}
	c->on_data = PyObject_GetAttrString(protocol, "data_received");
	if (!c->on_data)
		return NULL;
	t = PyObject_New(Transport, &TransportType);
	if (!t) {
		Py_CLEAR(c->on_data);
		return NULL;
	}
	t->loop = Py_NewRef(self);
	t->fd = fd;
	t->gen = c->gen;
	t->extra = extra == Py_None ? NULL : Py_NewRef(extra);
	t->closed_by_user = 0;
	c->protocol = Py_NewRef(protocol);
	c->has_eof = has_method(protocol, "eof_received");
	c->has_lost = has_method(protocol, "connection_lost");
	c->has_pause = has_method(protocol, "pause_writing");
	c->has_resume = has_method(protocol, "resume_writing");
	c->on_closed = on_closed == Py_None ? NULL : Py_NewRef(on_closed);
	c->owner = Py_NewRef(owner);
	c->transport = Py_NewRef((PyObject *)t);
	c->high_water = DEFAULT_HIGH_WATER;
	c->low_water = DEFAULT_HIGH_WATER / 4;
	{
		PyObject *made = optional_method(protocol, "connection_made");

		if (made) {
			Py_XDECREF(protocol_call_method(L, c, made, (PyObject *)t));
			Py_DECREF(made);
		}
	}
	if (!c->dead && !c->closing) {
		if (L->mode == MODE_URING) {
			c->want_recv = 1;
		} else if (c->registered) {
			c->want_read = 1; /* no new edge will come for what is already there */
		} else if (epoll_register(L, c) < 0) {
			protocol_fail(L, c, errno);
		}
		if (!c->dead)
			mark_dirty(L, c);
	}
	/* An error pending from a dispatch (L->pending_error) is left for turn() to raise: the connection is ours now,
	 * and raising here would make the caller believe the fd is still its own to close. */
	return (PyObject *)t;
}

static PyTypeObject LoopType;

static int loop_init(Loop *L, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = {"driver", "mode", "ring", "ids", "results", "cqe_flags", "capacity", "python_epoll_fd",
				 NULL};
	PyObject *driver, *ready;
	const char *mode;
	unsigned long long ring = 0, ids = 0, results = 0, flags = 0;
	unsigned capacity = 0;
	int python_epfd = -1;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "Os|$KKKKIi", kwlist, &driver, &mode, &ring, &ids, &results,
					 &flags, &capacity, &python_epfd))
		return -1;
	if (L->mode) {
		PyErr_SetString(PyExc_RuntimeError, "an engine is initialised once");
		return -1;
	}
	L->epfd = -1;
	L->python_epfd = -1;
	ready = PyObject_GetAttrString(driver, "_ready");
	if (!ready)
		return -1;
	L->ready_append = PyObject_GetAttrString(ready, "append");
	Py_DECREF(ready);
	L->handle = PyObject_GetAttrString(driver, "_handle");
	L->finish_task = PyObject_GetAttrString(driver, "_finish_task");
	if (!L->ready_append || !L->handle || !L->finish_task)
		return -1;
	if (strcmp(mode, "uring") == 0) {
		if (!ring || !ids || !results || !flags || !capacity) {
			PyErr_SetString(PyExc_ValueError, "the uring engine needs ring, ids, results, cqe_flags, capacity");
			return -1;
		}
		L->ring = (struct iokit_ring *)(uintptr_t)ring;
		if (!L->ring->buf_ring) {
			PyErr_SetString(PyExc_ValueError, "the uring engine needs the ring's provided buffers");
			return -1;
		}
		L->ids = (uint64_t *)(uintptr_t)ids;
		L->results = (int32_t *)(uintptr_t)results;
		L->cqe_flags = (uint32_t *)(uintptr_t)flags;
		L->capacity = capacity;
		L->ring->engine = L;
		L->ring->engine_completion = uring_completion;
		L->mode = MODE_URING;
	} else if (strcmp(mode, "epoll") == 0) {
		struct epoll_event ev;

		L->epfd = epoll_create1(EPOLL_CLOEXEC);
		if (L->epfd < 0) {
			PyErr_SetFromErrno(PyExc_OSError);
			return -1;
		}
		L->scratch = PyMem_Malloc(SCRATCH_BYTES);
		if (!L->scratch) {
			PyErr_NoMemory();
			return -1;
		}
		if (python_epfd >= 0) {
			/* The Python backend's epoll set (its wakeup eventfd, its file pool, the rare ops) inside ours:
			 * one epoll_wait per turn sees both. */
			ev.events = EPOLLIN;
			ev.data.u64 = EPOLL_PYTHON_TAG;
			if (epoll_ctl(L->epfd, EPOLL_CTL_ADD, python_epfd, &ev) < 0) {
				PyErr_SetFromErrno(PyExc_OSError);
				return -1;
			}
			L->python_epfd = python_epfd;
		}
		L->mode = MODE_EPOLL;
	} else {
		PyErr_Format(PyExc_ValueError, "mode must be 'uring' or 'epoll', not %R", PyTuple_GET_ITEM(args, 1));
		return -1;
	}
	return 0;
}

/* Drop every Conn: the runtime has ended, so no task waits on one. uring: the caller drains the ring first. */
static void loop_forget_all(Loop *L)
{
	int fd;

	for (fd = 0; fd < L->conns_cap; fd++) {
		Conn *c = L->conns[fd];

		if (!c)
			continue;
		Py_CLEAR(c->reader);
		Py_CLEAR(c->writer);
		while (c->acceptor) {
			Trap *t = acceptor_pop(c);

			Py_DECREF(t);
		}
		Py_CLEAR(c->closer);
		conn_retire(L, c);
	}
}

static void loop_dealloc(Loop *L)
{
	if (L->ring && L->ring->engine == L) {
		L->ring->engine_completion = NULL;
		L->ring->engine = NULL;
	}
	loop_forget_all(L);
	bury(L);
	PyMem_Free(L->conns);
	PyMem_Free(L->scratch);
	if (L->epfd >= 0)
		close(L->epfd);
	Py_XDECREF(L->ready_append);
	Py_XDECREF(L->handle);
	Py_XDECREF(L->finish_task);
	Py_XDECREF(L->pending_error);
	Py_TYPE(L)->tp_free((PyObject *)L);
}

static PyObject *raise_pending(Loop *L)
{
	PyObject *error = L->pending_error;

	if (!error)
		return NULL;
	L->pending_error = NULL;
	PyErr_SetObject((PyObject *)Py_TYPE(error), error);
	Py_DECREF(error);
	return NULL;
}

static int parse_fd(PyObject *arg, int *fd)
{
	long value = PyLong_AsLong(arg);

	if (value == -1 && PyErr_Occurred())
		return -1;
	if (value < 0 || value > INT32_MAX) {
		PyErr_Format(PyExc_ValueError, "fd must be a non-negative int, got %ld", value);
		return -1;
	}
	*fd = (int)value;
	return 0;
}

static PyObject *loop_receive(Loop *L, PyObject *const *args, Py_ssize_t nargs)
{
	Trap *t;
	int fd;
	Py_ssize_t size;

	(void)L;
	if (nargs != 2) {
		PyErr_SetString(PyExc_TypeError, "receive(fd, max_bytes)");
		return NULL;
	}
	if (parse_fd(args[0], &fd) < 0)
		return NULL;
	size = PyLong_AsSsize_t(args[1]);
	if (size == -1 && PyErr_Occurred())
		return NULL;
	if (size <= 0) {
		PyErr_Format(PyExc_ValueError, "max_bytes must be > 0, got %zd", size);
		return NULL;
	}
	t = trap_new(T_RECEIVE, fd);
	if (t)
		t->size = size;
	return (PyObject *)t;
}

static PyObject *buffer_trap(int kind, PyObject *const *args, Py_ssize_t nargs, int writable, const char *usage)
{
	Trap *t;
	int fd;

	if (nargs != 2) {
		PyErr_SetString(PyExc_TypeError, usage);
		return NULL;
	}
	if (parse_fd(args[0], &fd) < 0)
		return NULL;
	t = trap_new(kind, fd);
	if (!t)
		return NULL;
	if (PyObject_GetBuffer(args[1], &t->view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
		t->view.obj = NULL;
		Py_DECREF(t);
		return NULL;
	}
	return (PyObject *)t;
}

static PyObject *loop_recv_into(Loop *L, PyObject *const *args, Py_ssize_t nargs)
{
	(void)L;
	return buffer_trap(T_RECV_INTO, args, nargs, 1, "recv_into(fd, buffer)");
}

static PyObject *loop_send_all(Loop *L, PyObject *const *args, Py_ssize_t nargs)
{
	(void)L;
	return buffer_trap(T_SEND, args, nargs, 0, "send_all(fd, data)");
}

static PyObject *fd_trap(int kind, PyObject *arg)
{
	int fd;

	if (parse_fd(arg, &fd) < 0)
		return NULL;
	return (PyObject *)trap_new(kind, fd);
}

static PyObject *loop_accept(Loop *L, PyObject *arg)
{
	(void)L;
	return fd_trap(T_ACCEPT, arg);
}

static PyObject *loop_close_fd(Loop *L, PyObject *arg)
{
	(void)L;
	return fd_trap(T_CLOSE, arg);
}

static PyObject *loop_shutdown_write(Loop *L, PyObject *arg)
{
	(void)L;
	return fd_trap(T_SHUTDOWN, arg);
}

static PyObject *loop_wait_readable(Loop *L, PyObject *arg)
{
	(void)L;
	return fd_trap(T_WAIT_READABLE, arg);
}

/* resume(task, value, exc): the driver's way to run a task; traps it yields are handled here. */
static PyObject *loop_resume(Loop *L, PyObject *const *args, Py_ssize_t nargs)
{
	if (nargs != 3 || !PyObject_TypeCheck(args[0], &TaskBaseType)) {
		PyErr_SetString(PyExc_TypeError, "resume(task, value, exc)");
		return NULL;
	}
	run_task(L, (TaskBase *)args[0], args[1], args[2] == Py_None ? NULL : args[2]);
	if (L->pending_error)
		return raise_pending(L);
	Py_RETURN_NONE;
}

/* start(task, trap): a task stepped by Python yielded a trap; start it and, if it finished, run the task on. */
static PyObject *loop_start(Loop *L, PyObject *const *args, Py_ssize_t nargs)
{
	TaskBase *task;
	Trap *t;

	if (nargs != 2 || !PyObject_TypeCheck(args[0], &TaskBaseType) || !Py_IS_TYPE(args[1], &TrapType)) {
		PyErr_SetString(PyExc_TypeError, "start(task, trap)");
		return NULL;
	}
	task = (TaskBase *)args[0];
	t = (Trap *)args[1];
	if (t->state != TRAP_YIELDED) {
		PyErr_SetString(PyExc_RuntimeError, "this operation was started already");
		return NULL;
	}
	if (start_trap(L, task, t))
		run_task(L, task, Py_None, NULL);
	if (L->pending_error)
		return raise_pending(L);
	Py_RETURN_NONE;
}

/* cancel(trap): a scope covering the parked task was cancelled. Receives and sends waiting in the engine end at once
 * (no byte is lost: received bytes stay queued for the next reader, queued sends still go out); an accept in the
 * kernel is cancelled there, and its CQE decides; close and shutdown are not interrupted. */
static PyObject *loop_cancel(Loop *L, PyObject *arg)
{
	Trap *t;
	Conn *c;

	if (!Py_IS_TYPE(arg, &TrapType)) {
		PyErr_SetString(PyExc_TypeError, "cancel(trap)");
		return NULL;
	}
	t = (Trap *)arg;
	if (t->state != TRAP_YIELDED || !t->task || t->cancel_requested)
		Py_RETURN_NONE;
	t->cancel_requested = 1;
	c = conn_get(L, t->fd);
	if (!c)
		Py_RETURN_NONE;
	if (c->closer == t) {
		/* A close given a deadline (or cancelled) stops waiting for the queued bytes: they are dropped, and the fd
		 * closes as soon as no request of ours holds it. The closer wakes then, not before. */
		c->send_broken = 1;
		t->cancel_requested = 0;
		if (ready_to_close(L, c)) {
			c->closer = NULL;
			close_now(L, c, t);
			schedule(L, t);
		} else if (L->mode == MODE_URING) {
			c->want_cancel = 1;
			mark_dirty(L, c);
		}
	} else if (c->writer == t) {
		if (L->mode == MODE_URING && c->send_in_flight) {
			c->writer_cancelled = 1; /* the send in flight decides how much went out: see SQE_SEND */
		} else {
			c->writer = NULL;
			cut_writer(c, t);
			schedule(L, t);
		}
	} else if (c->reader == t || acceptor_remove(c, t)) {
		if (c->reader == t) {
			c->reader = NULL;
		} else if (!c->acceptor) {
			/* uring: the accept stays in the kernel and is cancelled there; a connection it makes before that
			 * goes to the next acceptor, or is closed if there is none (SQE_ACCEPT). */
			if (c->accept_in_flight && !c->accept_cancel_sent) {
				c->want_cancel = 1;
				mark_dirty(L, c);
			}
		}
		trap_fail_cancelled(t);
		schedule(L, t);
	}
	if (c->writer_cancelled) {
		c->want_cancel = 1;
		mark_dirty(L, c);
	}
	if (L->pending_error)
		return raise_pending(L);
	Py_RETURN_NONE;
}

/* forget(fd): the fd was closed behind the engine (an Op CLOSE): drop what the engine knew of it. */
static PyObject *loop_forget(Loop *L, PyObject *arg)
{
	int fd;
	Conn *c;

	if (parse_fd(arg, &fd) < 0)
		return NULL;
	c = conn_get(L, fd);
	if (c && !c->reader && !c->writer && !c->acceptor && !c->closer && !c->recv_armed && !c->send_in_flight &&
	    !c->accept_in_flight && !c->unsent) {
		if (c->registered)
			epoll_ctl(L->epfd, EPOLL_CTL_DEL, fd, NULL);
		conn_retire(L, c);
	}
	Py_RETURN_NONE;
}

static int64_t timeout_to_ns(PyObject *timeout, int *ok)
{
	double seconds;

	*ok = 1;
	if (timeout == Py_None)
		return -1;
	seconds = PyFloat_AsDouble(timeout);
	if (seconds == -1.0 && PyErr_Occurred()) {
		*ok = 0;
		return 0;
	}
	if (seconds <= 0)
		return 0;
	if (seconds > 1e9)
		return -1;
	return (int64_t)(seconds * 1e9);
}

/*
 * turn(timeout): one cycle. Flush what tasks queued, wait up to `timeout` seconds (None: no limit) with the GIL
 * released, and dispatch every completion (resuming tasks in C). uring: returns how many completions of Python ops it
 * put in the backend's arrays; epoll: whether the Python backend's own epoll set has events.
 */
static PyObject *loop_turn(Loop *L, PyObject *arg)
{
	int ok, ret;
	int64_t timeout_ns = timeout_to_ns(arg, &ok);
	unsigned long long resumes, callbacks;

	if (!ok)
		return NULL;
	resumes = L->resumes;
	callbacks = L->callbacks;
	L->turns++;
	flush_all(L);
	/* Come back at once if the flush woke a task (a closer or writer whose bytes left: it may have finished the
	 * program, or queued more), called a protocol (resume_reading's bytes, resume_writing: it may have made work
	 * for Python, a task to wake, asyncio callbacks) or left something it found no room for. */
	if (L->dirty || L->resumes != resumes || L->callbacks != callbacks)
		timeout_ns = 0;
	if (L->mode == MODE_URING) {
		unsigned reaped;

		iokit_ring_before_wait(L->ring);
		Py_BEGIN_ALLOW_THREADS
		ret = iokit_ring_enter(L->ring, timeout_ns < 0 ? FOREVER_SLICE_NS : timeout_ns);
		Py_END_ALLOW_THREADS
		if (ret == -EINTR) {
			if (PyErr_CheckSignals() < 0)
				return NULL;
		} else if (ret < 0 && ret != -ETIME && ret != -EBUSY && ret != -EAGAIN) {
			errno = -ret;
			return PyErr_SetFromErrno(PyExc_OSError);
		}
		reaped = iokit_ring_reap(L->ring, L->ids, L->results, L->cqe_flags, L->capacity);
		bury(L);
		if (L->pending_error)
			return raise_pending(L);
		return PyLong_FromUnsignedLong(reaped);
	} else {
		struct epoll_event events[EPOLL_EVENTS];
		int timeout_ms = timeout_ns < 0 ? -1 : (int)((timeout_ns + 999999) / 1000000);
		int python_ready = 0, i;

		if (timeout_ns > 0 && timeout_ms == 0)
			timeout_ms = 1;
		Py_BEGIN_ALLOW_THREADS
		ret = epoll_wait(L->epfd, events, EPOLL_EVENTS, timeout_ms);
		Py_END_ALLOW_THREADS
		if (ret < 0) {
			if (errno != EINTR)
				return PyErr_SetFromErrno(PyExc_OSError);
			if (PyErr_CheckSignals() < 0)
				return NULL;
			ret = 0;
		}
		for (i = 0; i < ret; i++) {
			if (events[i].data.u64 == EPOLL_PYTHON_TAG)
				python_ready = 1;
			else
				epoll_event(L, events[i].data.u64, events[i].events);
		}
		bury(L);
		if (L->pending_error)
			return raise_pending(L);
		return PyBool_FromLong(python_ready);
	}
}

/* drain(): cancel the engine's requests in the kernel (uring) so the ring can close; returns how many are still in
 * flight (call turn(0.01) until 0). Conns are forgotten: the runtime has ended. */
static PyObject *loop_drain(Loop *L, PyObject *unused)
{
	int fd;

	(void)unused;
	L->draining = 1;
	for (fd = 0; fd < L->conns_cap; fd++) {
		Conn *c = L->conns[fd];

		if (!c)
			continue;
		c->closing = 1; /* nothing re-arms */
		if (!c->send_in_flight)
			segments_drop(c); /* the bytes of a send in flight stay until its CQE (SQE_SEND drops them) */
		if (L->mode == MODE_URING && (c->recv_armed || c->accept_in_flight || c->send_in_flight)) {
			c->want_cancel = 1;
			mark_dirty(L, c);
		}
	}
	if (L->mode == MODE_URING && L->in_flight)
		return PyLong_FromUnsignedLong(L->in_flight);
	loop_forget_all(L);
	return PyLong_FromLong(0);
}

/* set_faults(seed, eagain=0, short=0, reset=0, cancel_race=0): inject those faults on the engine's socket ops (see
 * iokit/backends/faults.py, which calls this for the backend it wraps). */
static PyObject *loop_set_faults(Loop *L, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = {"seed", "eagain", "short", "reset", "cancel_race", NULL};
	unsigned long long seed = 0;
	double eagain = 0, short_transfer = 0, reset = 0, cancel_race = 0;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "K|dddd", kwlist, &seed, &eagain, &short_transfer, &reset,
					 &cancel_race))
		return NULL;
	L->faults.cancel_race = cancel_race;
	L->faults.eagain = eagain;
	L->faults.short_transfer = short_transfer;
	L->faults.reset = reset;
	L->faults.state = seed * 0x9E3779B97F4A7C15ULL + 1; /* never 0: xorshift would stay there */
	L->faults.on = eagain > 0 || short_transfer > 0 || reset > 0 || cancel_race > 0;
	Py_RETURN_NONE;
}

/* detach(): the ring stops calling this engine (call after drain() said 0, before the ring closes). */
static PyObject *loop_detach(Loop *L, PyObject *unused)
{
	(void)unused;
	if (L->ring && L->ring->engine == L) {
		L->ring->engine_completion = NULL;
		L->ring->engine = NULL;
	}
	L->ring = NULL;
	loop_forget_all(L);
	bury(L);
	Py_RETURN_NONE;
}

static PyObject *loop_statistics(Loop *L, PyObject *unused)
{
	(void)unused;
	/* recv_buffers: uring's provided buffers given to the kernel so far (they grow with load); 0 on epoll. */
	return Py_BuildValue("{s:i,s:I,s:K,s:K,s:K,s:K,s:K,s:K,s:I,s:{s:K,s:K,s:K,s:K}}", "connections", L->live_conns,
			     "in_flight", L->in_flight, "resumes", L->resumes, "traps", L->traps, "turns", L->turns,
			     "completions", L->completions, "sends", L->sends, "stale_events", L->stale, "recv_buffers",
			     L->ring ? L->ring->buffers_in_ring : 0u, "injected",
			     "eagain", L->faults.eagains, "short", L->faults.shorts, "reset", L->faults.resets,
			     "cancel_race", L->faults.cancel_races);
}

static PyMethodDef loop_methods[] = {
	{"receive", (PyCFunction)(void (*)(void))loop_receive, METH_FASTCALL,
	 "receive(fd, max_bytes) -> awaitable: up to max_bytes as bytes; b'' at end of stream"},
	{"recv_into", (PyCFunction)(void (*)(void))loop_recv_into, METH_FASTCALL,
	 "recv_into(fd, buffer) -> awaitable: the count received into buffer; 0 at end of stream"},
	{"send_all", (PyCFunction)(void (*)(void))loop_send_all, METH_FASTCALL,
	 "send_all(fd, data) -> awaitable: queues all of data; waits only while the queue is over its bound"},
	{"accept", (PyCFunction)loop_accept, METH_O, "accept(fd) -> awaitable: the new connection's fd"},
	{"close", (PyCFunction)loop_close_fd, METH_O, "close(fd) -> awaitable: closes once the queued bytes left"},
	{"shutdown_write", (PyCFunction)loop_shutdown_write, METH_O,
	 "shutdown_write(fd) -> awaitable: end of stream to the peer, after the queued bytes"},
	{"wait_readable", (PyCFunction)loop_wait_readable, METH_O,
	 "wait_readable(fd) -> awaitable: returns once data (or the end of stream) is there to receive"},
	{"resume", (PyCFunction)(void (*)(void))loop_resume, METH_FASTCALL, "resume(task, value, exc)"},
	{"start", (PyCFunction)(void (*)(void))loop_start, METH_FASTCALL, "start(task, trap)"},
	{"cancel", (PyCFunction)loop_cancel, METH_O, "cancel(trap)"},
	{"forget", (PyCFunction)loop_forget, METH_O, "forget(fd)"},
	{"turn", (PyCFunction)loop_turn, METH_O, "turn(timeout)"},
	{"drain", (PyCFunction)loop_drain, METH_NOARGS, "drain() -> engine requests still in flight"},
	{"attach_protocol", (PyCFunction)(void (*)(void))loop_attach_protocol, METH_VARARGS | METH_KEYWORDS,
	 "attach_protocol(fd, protocol, owner, extra=None, on_closed=None) -> Transport: the engine drives the "
	 "connection and calls the protocol's methods"},
	{"detach", (PyCFunction)loop_detach, METH_NOARGS, "detach(): after drain(), before the ring closes"},
	{"set_faults", (PyCFunction)(void (*)(void))loop_set_faults, METH_VARARGS | METH_KEYWORDS,
	 "set_faults(seed, eagain=0, short=0, reset=0, cancel_race=0): inject faults on the socket ops"},
	{"statistics", (PyCFunction)loop_statistics, METH_NOARGS, "statistics() -> dict"},
	{NULL},
};

static PyTypeObject LoopType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "iokit._engine.Loop",
	.tp_basicsize = sizeof(Loop),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Loop(driver, mode, *, ring, ids, results, cqe_flags, capacity, python_epoll_fd): the native engine.",
	.tp_init = (initproc)loop_init,
	.tp_new = PyType_GenericNew,
	.tp_dealloc = (destructor)loop_dealloc,
	.tp_methods = loop_methods,
};

/* ---------------------------------------------------------------------------------------------------------------- */
/* Module                                                                                                            */

static PyObject *engine_current_task(PyObject *module, PyObject *unused)
{
	(void)module;
	(void)unused;
	if (!current) {
		PyErr_SetString(PyExc_RuntimeError, "this must be called from a task inside iokit.run()");
		return NULL;
	}
	return Py_NewRef(current);
}

static PyObject *engine_set_current_task(PyObject *module, PyObject *task)
{
	PyObject *previous = current;

	(void)module;
	current = task == Py_None ? NULL : Py_NewRef(task);
	Py_XDECREF(previous);
	Py_RETURN_NONE;
}

static PyObject *engine_configure(PyObject *module, PyObject *cancelled)
{
	(void)module;
	Py_XSETREF(Cancelled, Py_NewRef(cancelled));
	Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
	{"current_task", engine_current_task, METH_NOARGS, "The task running on this thread; RuntimeError if none."},
	{"set_current_task", engine_set_current_task, METH_O, "Set the task running on this thread (None: none)."},
	{"configure", engine_configure, METH_O, "configure(Cancelled): the exception a cancelled trap raises."},
	{NULL},
};

static struct PyModuleDef engine_module = {
	PyModuleDef_HEAD_INIT, "iokit._engine", "iokit's native engine (csrc/iokit_engine.c).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__engine(void)
{
	PyObject *m;

	if (PyType_Ready(&TaskBaseType) < 0 || PyType_Ready(&TrapType) < 0 || PyType_Ready(&LoopType) < 0 ||
	    PyType_Ready(&TransportType) < 0)
		return NULL;
	m = PyModule_Create(&engine_module);
	if (!m)
		return NULL;
	if (PyModule_AddObjectRef(m, "TaskBase", (PyObject *)&TaskBaseType) < 0 ||
	    PyModule_AddObjectRef(m, "Trap", (PyObject *)&TrapType) < 0 ||
	    PyModule_AddObjectRef(m, "Loop", (PyObject *)&LoopType) < 0 ||
	    PyModule_AddObjectRef(m, "Transport", (PyObject *)&TransportType) < 0 ||
	    PyModule_AddIntConstant(m, "SEND_HIGH_WATER", SEND_HIGH_WATER) < 0 ||
	    PyModule_AddIntConstant(m, "RECV_HIGH_WATER", RECV_HIGH_WATER) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
