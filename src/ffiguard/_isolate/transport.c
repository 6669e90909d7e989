/* ffiguard._isolate: the synchronous shared-memory transport of isolate mode.
 *
 * A call slot is a small header in memory shared by the host and the helper process
 * (see ffiguard/isolate/_wire.py for the layout).  Its first word is the slot's state
 * and the futex both sides sleep on; the next two words say whether the host (0) or
 * the helper (1) is asleep on it, so that the other side only makes the FUTEX_WAKE
 * system call when somebody actually sleeps.
 *
 * exchange() (and the fast path below, which uses the same wait) is the hot part: optionally store a new state (and wake the
 * peer if it sleeps), then wait, with the GIL released, until the state is no longer
 * `wait_while`: first spinning for a bounded time (only if this process has fewer
 * than `spin_limit` threads spinning right now: on one CPU spinning only steals the
 * peer's time; see the leases below), then sleeping on the futex.  The host sleeps in slices and checks
 * between them whether the helper died (waitid with WNOWAIT, the zombie is left for
 * the Python side to reap) and whether its deadline passed.
 *
 * Everything in shared memory may have been scribbled on by a misbehaving helper:
 * this code only ever compares the state word, never trusts it for memory accesses.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE 1
#include <Python.h>
#include <structmember.h>

#include <math.h>
#include <string.h>

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if PY_VERSION_HEX < 0x030A0000
static inline PyObject *Py_NewRef(PyObject *o)
{
    Py_INCREF(o);
    return o;
}
#endif

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

enum { RC_TIMEOUT = -1, RC_DEAD = -2, RC_INTERRUPTED = -3 };

typedef struct {
    _Atomic uint32_t state;
    _Atomic uint32_t sleeping[2]; /* [0]: the host waits on state, [1]: the helper */
} slot_head;

/* Per process: which side this is and how long to spin.  Who may spin is decided by
 * leases in memory shared by the host and all its helpers (the first page of the
 * foreign heap): at most spin_limit threads of the host and its helpers together spin
 * at any moment (CPUs - 1, so the thread doing the work always has a CPU).  A lease is
 * the CLOCK_MONOTONIC time its spinner stops; a lease left behind by a killed helper
 * simply expires. */
#define MAX_LEASES 16
static int side;                /* 0 host, 1 helper */
static long long spin_ns;       /* 0: never spin */
static int spin_limit;          /* at most this many spinners (<= MAX_LEASES) */
static long long slice_ns = 5000000; /* host: check the helper's liveness this often */
static long long grace_ns = 5000;    /* how long to try for a lease held by the peer */
static _Atomic long long local_leases[MAX_LEASES + 32];
static _Atomic long long *leases = local_leases;
/* Calls in flight from the host to all its helpers (same shared page, after the
 * leases): nobody spins while more than one call is in flight, since then the
 * threads doing the work need every CPU and spinning only delays them. */
static _Atomic int *inflight = (_Atomic int *)&local_leases[MAX_LEASES + 16];
enum { ST_CALL = 1, ST_CB_REQ = 3 }; /* as in ffiguard/isolate/_wire.py */
static _Atomic unsigned long long n_spin_hits, n_sleeps, n_wakes, n_no_lease;
/* Adaptive spin budget (per process): halved each time a spin ends without an answer
 * (a slow call, or the peer waiting for the CPU this thread is spinning on: the
 * scheduler may put both on one CPU when the machine is busy), doubled on success,
 * between SPIN_FLOOR and spin_ns. */
#define SPIN_FLOOR 20000LL
static _Atomic long long spin_cur;

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static long futex_wait(_Atomic uint32_t *word, uint32_t expected, const struct timespec *rel)
{
    /* Not FUTEX_PRIVATE_FLAG: the word is shared with another process. */
    return syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, rel, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *word)
{
    atomic_fetch_add_explicit(&n_wakes, 1, memory_order_relaxed);
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Has child `pid` exited (or been reaped by someone else)?  Leaves a zombie in place. */
static int peer_dead(pid_t pid)
{
    siginfo_t info;
    info.si_pid = 0;
    if (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) == -1)
        return errno == ECHILD;
    return info.si_pid == pid;
}

static int do_exchange(slot_head *h, long long set_state, uint32_t wait_while,
                       long long deadline, pid_t pid)
{
    const int me = side, peer = 1 - side;
    uint32_t s;

    if (set_state >= 0) {
        atomic_store(&h->state, (uint32_t)set_state);
        if (atomic_load(&h->sleeping[peer]))
            futex_wake(&h->state);
    }

    if (spin_ns > 0 && spin_limit > 0 && atomic_load(inflight) <= 1) {
        long long budget = atomic_load_explicit(&spin_cur, memory_order_relaxed);
        if (budget < SPIN_FLOOR)
            budget = SPIN_FLOOR;
        long long start = now_ns(), end = start + budget, lease = end + 1000000;
        int held = -1;
        if (deadline && end > deadline)
            end = deadline;
        for (unsigned i = 1;; i++) {
            s = atomic_load_explicit(&h->state, memory_order_acquire);
            if (s != wait_while) {
                if (held >= 0) {
                    long long mine = lease;
                    atomic_compare_exchange_strong(&leases[held], &mine, 0);
                }
                atomic_fetch_add_explicit(&n_spin_hits, 1, memory_order_relaxed);
                if (budget < spin_ns)
                    atomic_store_explicit(&spin_cur, budget * 2 > spin_ns ? spin_ns : budget * 2,
                                          memory_order_relaxed);
                return (int)s;
            }
            if (held < 0) {
                /* Take a free or expired lease; the peer that just handed this slot
                 * over is about to give its lease up, hence the grace period. */
                long long t = (i & 15) == 1 ? now_ns() : start;
                for (int k = 0; k < spin_limit; k++) {
                    long long v = atomic_load(&leases[k]);
                    if ((v == 0 || v < t) && atomic_compare_exchange_strong(&leases[k], &v, lease)) {
                        held = k;
                        break;
                    }
                }
                if (held < 0 && (i & 15) == 0 && now_ns() - start > grace_ns) {
                    atomic_fetch_add_explicit(&n_no_lease, 1, memory_order_relaxed);
                    break;
                }
            }
            cpu_relax();
            if ((i & 63) == 0) {
                if (now_ns() >= end) {
                    atomic_store_explicit(&spin_cur, budget / 2, memory_order_relaxed);
                    break;
                }
                if (atomic_load(inflight) > 1)
                    break;
            }
        }
        if (held >= 0) {
            long long mine = lease;
            atomic_compare_exchange_strong(&leases[held], &mine, 0);
        }
    }

    atomic_fetch_add_explicit(&n_sleeps, 1, memory_order_relaxed);
    for (;;) {
        struct timespec ts, *tp = NULL;
        long long wait = -1;
        if (pid > 0)
            wait = slice_ns;
        if (deadline) {
            long long left = deadline - now_ns();
            if (left <= 0)
                return RC_TIMEOUT;
            if (wait < 0 || left < wait)
                wait = left;
        }
        if (wait >= 0) {
            ts.tv_sec = (time_t)(wait / 1000000000LL);
            ts.tv_nsec = (long)(wait % 1000000000LL);
            tp = &ts;
        }
        /* Dekker with the peer's store-state-then-load-sleeping: either it sees our
         * flag and wakes us, or we see its new state here (or futex_wait does). */
        atomic_store(&h->sleeping[me], 1);
        s = atomic_load(&h->state);
        if (s != wait_while) {
            atomic_store(&h->sleeping[me], 0);
            return (int)s;
        }
        long r = futex_wait(&h->state, wait_while, tp);
        int err = errno;
        atomic_store(&h->sleeping[me], 0);
        s = atomic_load(&h->state);
        if (s != wait_while)
            return (int)s;
        if (r == -1 && err == EINTR && side == 0)
            return RC_INTERRUPTED;
        if (pid > 0 && peer_dead(pid)) {
            s = atomic_load(&h->state); /* it may have answered just before dying */
            return s != wait_while ? (int)s : RC_DEAD;
        }
        if (deadline && now_ns() >= deadline)
            return RC_TIMEOUT;
    }
}

static int as_ll(PyObject *o, long long *out)
{
    *out = PyLong_AsLongLong(o);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

enum { RC_PYERR = -100 }; /* a Python exception is set (Ctrl-C while waiting) */

/* One exchange with the GIL released, the host's count of calls in flight kept, and
 * signals handled (a handler that raises ends the wait: RC_PYERR). */
static int run_exchange(slot_head *h, long long set_state, uint32_t wait_while, long long deadline,
                        pid_t pid)
{
    int rc;
    /* Host: a call is in flight from exchange(CALL) until an exchange returns anything
     * but a callback request (the CB_RET exchanges continue the same call). */
    if (side == 0 && set_state == ST_CALL)
        atomic_fetch_add(inflight, 1);
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = do_exchange(h, set_state, wait_while, deadline, pid);
        Py_END_ALLOW_THREADS
        if (rc != RC_INTERRUPTED)
            break;
        if (PyErr_CheckSignals() < 0) {
            if (side == 0)
                atomic_fetch_sub(inflight, 1);
            return RC_PYERR;
        }
        set_state = -1;
    }
    if (side == 0 && rc != ST_CB_REQ)
        atomic_fetch_sub(inflight, 1);
    return rc;
}

/* exchange(slot_address, set_state, wait_while, deadline_ns=0, pid=0) -> int
 *
 * set_state < 0: store nothing.  deadline_ns: CLOCK_MONOTONIC (time.monotonic_ns()),
 * 0 for none.  pid > 0: the helper to watch.  Returns the new state, or -1 when the
 * deadline passed, -2 when the helper died.  A signal handler that raises (Ctrl-C)
 * ends the wait with that exception. */
static PyObject *exchange(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long addr, set_state, wait_while, deadline = 0, pid = 0;
    (void)self;
    if (nargs < 3 || nargs > 5) {
        PyErr_SetString(PyExc_TypeError, "exchange() takes 3 to 5 arguments");
        return NULL;
    }
    if (as_ll(args[0], &addr) || as_ll(args[1], &set_state) || as_ll(args[2], &wait_while) ||
        (nargs > 3 && as_ll(args[3], &deadline)) || (nargs > 4 && as_ll(args[4], &pid)))
        return NULL;
    if (!addr || (addr & 63)) {
        PyErr_SetString(PyExc_ValueError, "exchange(): bad slot address");
        return NULL;
    }
    int rc = run_exchange((slot_head *)(uintptr_t)addr, set_state, (uint32_t)wait_while, deadline,
                          (pid_t)pid);
    if (rc == RC_PYERR)
        return NULL;
    return PyLong_FromLong(rc);
}

/* ---- the scalar fast path ----------------------------------------------------------
 *
 * A call whose arguments and result are all plain numbers (struct codes bBhHiIlLqQfd?c,
 * and P for a c_void_p argument given as a plain int or None) skips Python on both
 * sides.  Host: IsolatedFunction's C base (Function) packs the arguments straight into
 * the slot, exchanges and unpacks the result.  Helper: serve() waits for requests and
 * runs the ones of functions registered as fast by calling the guarded ctypes function
 * (ffiguard's trap, exactly as the Python path does) with PyObject_Vectorcall.  Anything
 * unusual (an argument of another type, a value out of range, a full slot list, a dead
 * or retired helper, a fault, a timeout) goes to the Python code, which behaves as it
 * always did.  The slot layout is the one the Python side uses (struct "@" of the wire
 * codes), so either side may take either path for any request.
 *
 * A descriptor (bytes, built by the Python side, checked here): [0] nargs, [1] result
 * code (0: void), [2] size of the packed arguments, [3] flags (FD_STRICT: arguments
 * were inferred without argtypes, only exact ints qualify), then (code, offset) per
 * argument. */
#define SLOT_HEAD 128
#define OFF_OP 16
#define OFF_STATUS 20
#define OFF_REQ_LEN 24
#define OFF_REP_LEN 28
#define ST_REPLY 2
#define ADMIN_BIT 0x80000000u
#define FAST_MAXARGS 24
#define FD_STRICT 1

typedef struct {
    unsigned char nargs, rescode, argsize, flags;
    unsigned char code[FAST_MAXARGS], off[FAST_MAXARGS];
} fastdesc;

static int code_size(int c)
{
    switch (c) {
    case 'b': case 'B': case '?': case 'c': return 1;
    case 'h': case 'H': return 2;
    case 'i': case 'I': case 'f': return 4;
    case 'l': case 'L': case 'q': case 'Q': case 'd': case 'P': return 8;
    default: return 0;
    }
}

static inline Py_ssize_t align16(Py_ssize_t n) { return (n + 15) & ~(Py_ssize_t)15; }

/* Parse and check a descriptor: every argument inside argsize, aligned, no overlap
 * with the result, the result inside `limit` bytes of payload. */
static int parse_desc(PyObject *o, fastdesc *d, Py_ssize_t limit)
{
    if (!PyBytes_Check(o) || PyBytes_GET_SIZE(o) < 4)
        goto bad;
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(o);
    Py_ssize_t len = PyBytes_GET_SIZE(o);
    d->nargs = b[0];
    d->rescode = b[1];
    d->argsize = b[2];
    d->flags = b[3];
    if (d->nargs > FAST_MAXARGS || len != 4 + 2 * (Py_ssize_t)d->nargs)
        goto bad;
    if (d->rescode && (!code_size(d->rescode) || d->rescode == 'P'))
        goto bad;
    if (align16(d->argsize) + 8 > limit)
        goto bad;
    unsigned end = 0;
    for (int k = 0; k < d->nargs; k++) {
        int c = b[4 + 2 * k], off = b[5 + 2 * k], n = code_size(c);
        if (!n || off % n || (unsigned)off < end || off + n > d->argsize)
            goto bad;
        d->code[k] = (unsigned char)c;
        d->off[k] = (unsigned char)off;
        end = (unsigned)(off + n);
    }
    return 0;
bad:
    PyErr_SetString(PyExc_ValueError, "ffiguard isolate: bad fast-path descriptor");
    return -1;
}

/* Host: one argument into the packed request.  1: packed; 0: not for the fast path
 * (the Python path converts it, with ctypes' rules and errors).  Never sets an error. */
static int pack_arg(int code, int strict, PyObject *a, unsigned char *dst)
{
    if (code == 'P') {
        if (a == Py_None) {
            memset(dst, 0, 8);
            return 1;
        }
        if (!PyLong_CheckExact(a))
            return 0;
    } else if (strict ? !PyLong_CheckExact(a) : 0) {
        return 0;
    }
    switch (code) {
    case 'f': case 'd': {
        double v;
        if (PyFloat_Check(a))
            v = PyFloat_AS_DOUBLE(a);
        else if (PyLong_Check(a)) {
            v = PyLong_AsDouble(a);
            if (v == -1.0 && PyErr_Occurred()) {
                PyErr_Clear();
                return 0;
            }
        } else
            return 0;
        if (code == 'd') {
            memcpy(dst, &v, 8);
        } else {
            if (isfinite(v) && (v > 3.4028234663852886e38 || v < -3.4028234663852886e38))
                return 0; /* struct raises OverflowError: let the Python path do it */
            float f = (float)v;
            memcpy(dst, &f, 4);
        }
        return 1;
    }
    case '?':
        if (!PyLong_CheckExact(a) && !PyBool_Check(a)) /* (no __bool__ of a subclass) */
            return 0;
        *dst = (unsigned char)PyObject_IsTrue(a);
        return 1;
    case 'c':
        if (!PyBytes_Check(a) || PyBytes_GET_SIZE(a) != 1)
            return 0;
        *dst = (unsigned char)PyBytes_AS_STRING(a)[0];
        return 1;
    default:
        break;
    }
    if (!PyLong_Check(a))
        return 0;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(a, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    unsigned long long u = (unsigned long long)v;
    if (overflow > 0 && (code == 'L' || code == 'Q')) {
        u = PyLong_AsUnsignedLongLong(a);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
    } else if (overflow) {
        return 0;
    }
    /* In range, or the Python path decides (it truncates the way ctypes does). */
    switch (code) {
    case 'b': if (v < -128 || v > 127) return 0; { int8_t x = (int8_t)v; memcpy(dst, &x, 1); } return 1;
    case 'B': if (v < 0 || v > 255) return 0; *dst = (unsigned char)v; return 1;
    case 'h': if (v < -32768 || v > 32767) return 0; { int16_t x = (int16_t)v; memcpy(dst, &x, 2); } return 1;
    case 'H': if (v < 0 || v > 65535) return 0; { uint16_t x = (uint16_t)v; memcpy(dst, &x, 2); } return 1;
    case 'i': if (v < INT32_MIN || v > INT32_MAX) return 0; { int32_t x = (int32_t)v; memcpy(dst, &x, 4); } return 1;
    case 'I': if (v < 0 || v > (long long)UINT32_MAX) return 0; { uint32_t x = (uint32_t)v; memcpy(dst, &x, 4); } return 1;
    case 'l': case 'q': case 'P':
        if (overflow || (code == 'P' && v < 0)) /* negative "pointers" mean slot offsets */
            return 0;
        memcpy(dst, &v, 8);
        return 1;
    case 'L': case 'Q':
        if (!overflow && v < 0)
            return 0;
        memcpy(dst, &u, 8);
        return 1;
    default:
        return 0;
    }
}

/* A number read from the slot as a Python object (the helper's arguments, the host's
 * result).  NULL with an exception on failure. */
static PyObject *unpack_value(int code, const unsigned char *src)
{
    switch (code) {
    case 'b': { int8_t x; memcpy(&x, src, 1); return PyLong_FromLong(x); }
    case 'B': return PyLong_FromLong(*src);
    case 'h': { int16_t x; memcpy(&x, src, 2); return PyLong_FromLong(x); }
    case 'H': { uint16_t x; memcpy(&x, src, 2); return PyLong_FromLong(x); }
    case 'i': { int32_t x; memcpy(&x, src, 4); return PyLong_FromLong(x); }
    case 'I': { uint32_t x; memcpy(&x, src, 4); return PyLong_FromUnsignedLong(x); }
    case 'l': case 'q': case 'P': { int64_t x; memcpy(&x, src, 8); return PyLong_FromLongLong(x); }
    case 'L': case 'Q': { uint64_t x; memcpy(&x, src, 8); return PyLong_FromUnsignedLongLong(x); }
    case 'f': { float x; memcpy(&x, src, 4); return PyFloat_FromDouble(x); }
    case 'd': { double x; memcpy(&x, src, 8); return PyFloat_FromDouble(x); }
    case '?': return PyBool_FromLong(*src != 0);
    case 'c': return PyBytes_FromStringAndSize((const char *)src, 1);
    default:
        PyErr_SetString(PyExc_SystemError, "ffiguard isolate: bad type code");
        return NULL;
    }
}

/* Helper: a ctypes result into the slot, as struct.pack_into would (ctypes results are
 * already in range).  -1 with an exception if it is not a number of that kind. */
static int pack_result(int code, PyObject *r, unsigned char *dst)
{
    switch (code) {
    case 'f': case 'd': {
        double v = PyFloat_AsDouble(r);
        if (v == -1.0 && PyErr_Occurred())
            return -1;
        if (code == 'd')
            memcpy(dst, &v, 8);
        else {
            float f = (float)v;
            memcpy(dst, &f, 4);
        }
        return 0;
    }
    case '?': {
        int t = PyObject_IsTrue(r);
        if (t < 0)
            return -1;
        *dst = (unsigned char)t;
        return 0;
    }
    case 'c':
        if (!PyBytes_Check(r) || PyBytes_GET_SIZE(r) != 1) {
            PyErr_SetString(PyExc_TypeError, "c_char result is not one byte");
            return -1;
        }
        *dst = (unsigned char)PyBytes_AS_STRING(r)[0];
        return 0;
    default: {
        if (!PyLong_Check(r)) {
            PyErr_SetString(PyExc_TypeError, "integer result expected");
            return -1;
        }
        unsigned long long u = PyLong_AsUnsignedLongLongMask(r);
        if (u == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        int n = code_size(code);
        if (n == 1) { uint8_t x = (uint8_t)u; memcpy(dst, &x, 1); }
        else if (n == 2) { uint16_t x = (uint16_t)u; memcpy(dst, &x, 2); }
        else if (n == 4) { uint32_t x = (uint32_t)u; memcpy(dst, &x, 4); }
        else memcpy(dst, &u, 8);
        return 0;
    }
    }
}

/* ---- Slot: one call slot, as the host's Python code sees it ---- */

/* Python objects, as __slots__ would hold them (Python reads them on every call of the
 * general path: no int object is made per access); the fast path converts `addr`. */
typedef struct {
    PyObject_HEAD
    PyObject *addr;            /* int: the slot header in this process */
    PyObject *index, *base, *payload, *limit, *cb_off; /* ints */
    PyObject *mem;             /* memoryview of the whole control region */
} SlotObject;

static PyMemberDef slot_members[] = {
    {"addr", T_OBJECT_EX, offsetof(SlotObject, addr), 0, NULL},
    {"index", T_OBJECT_EX, offsetof(SlotObject, index), 0, NULL},
    {"base", T_OBJECT_EX, offsetof(SlotObject, base), 0, NULL},
    {"payload", T_OBJECT_EX, offsetof(SlotObject, payload), 0, NULL},
    {"limit", T_OBJECT_EX, offsetof(SlotObject, limit), 0, NULL},
    {"cb_off", T_OBJECT_EX, offsetof(SlotObject, cb_off), 0, NULL},
    {"mem", T_OBJECT_EX, offsetof(SlotObject, mem), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static void slot_dealloc(SlotObject *self)
{
    Py_CLEAR(self->addr);
    Py_CLEAR(self->index);
    Py_CLEAR(self->base);
    Py_CLEAR(self->payload);
    Py_CLEAR(self->limit);
    Py_CLEAR(self->cb_off);
    Py_CLEAR(self->mem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject Slot_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ffiguard._isolate.Slot",
    .tp_doc = "A call slot of a helper's control region (host side).",
    .tp_basicsize = sizeof(SlotObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)slot_dealloc,
    .tp_members = slot_members,
};

/* ---- HelperBase: what the host's fast path reads of a helper (_Helper's C base) ---- */

/* Objects, read with T_OBJECT_EX members: CPython 3.11 specializes attribute access
 * for those (as for __slots__), not for T_BOOL or T_INT ones. */
typedef struct {
    PyObject_HEAD
    PyObject *dead, *retired; /* bools */
    PyObject *waiters;        /* int */
    PyObject *pid;    /* int (an object: Python reads it on every call) */
    PyObject *free;   /* list of free Slot objects */
} HelperObject;

static PyMemberDef helper_members[] = {
    {"dead", T_OBJECT_EX, offsetof(HelperObject, dead), 0, NULL},
    {"retired", T_OBJECT_EX, offsetof(HelperObject, retired), 0, NULL},
    {"waiters", T_OBJECT_EX, offsetof(HelperObject, waiters), 0, NULL},
    {"pid", T_OBJECT_EX, offsetof(HelperObject, pid), 0, NULL},
    {"free", T_OBJECT_EX, offsetof(HelperObject, free), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static int helper_traverse(HelperObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->free);
    Py_VISIT(self->pid);
    Py_VISIT(self->dead);
    Py_VISIT(self->retired);
    Py_VISIT(self->waiters);
    return 0;
}

static int helper_clear(HelperObject *self)
{
    Py_CLEAR(self->free);
    Py_CLEAR(self->pid);
    Py_CLEAR(self->dead);
    Py_CLEAR(self->retired);
    Py_CLEAR(self->waiters);
    return 0;
}

static void helper_dealloc(HelperObject *self)
{
    PyObject_GC_UnTrack(self);
    helper_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *helper_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    (void)args, (void)kw;
    HelperObject *self = (HelperObject *)type->tp_alloc(type, 0);
    if (self) {
        self->dead = Py_NewRef(Py_False);
        self->retired = Py_NewRef(Py_False);
        self->waiters = PyLong_FromLong(0);
        if (!self->waiters)
            Py_CLEAR(self);
    }
    return (PyObject *)self;
}

/* Is this helper taking fast calls?  (Anything but False: the Python path decides.) */
static inline int helper_usable(HelperObject *h)
{
    return h->dead == Py_False && h->retired == Py_False;
}

static inline int helper_waited_on(HelperObject *h)
{
    return h->retired != Py_False || !h->waiters || !PyLong_CheckExact(h->waiters) ||
           PyObject_IsTrue(h->waiters);
}

static PyTypeObject Helper_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ffiguard._isolate.HelperBase",
    .tp_doc = "The state of a helper process that the host's fast path reads.",
    .tp_basicsize = sizeof(HelperObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = helper_new,
    .tp_dealloc = (destructor)helper_dealloc,
    .tp_traverse = (traverseproc)helper_traverse,
    .tp_clear = (inquiry)helper_clear,
    .tp_members = helper_members,
};

/* ---- Function: IsolatedFunction's C base; its tp_call is the host's fast path ---- */

static PyObject *slow_call;   /* IsolatedFunction._call(self, *args) */
static PyObject *fast_fail;   /* _fast_fail(function, helper, slot, state, args, req_len) */
static PyObject *str_release;

typedef struct {
    PyObject_HEAD
    PyObject *timeout;        /* None: the library's */
    PyObject *errcheck;
    HelperObject *helper;     /* bound: the helper that knows fid (NULL: no fast path) */
    uint32_t fid;
    double lib_timeout;       /* seconds, 0: none */
    fastdesc desc;
} FunctionObject;

static PyMemberDef function_members[] = {
    {"timeout", T_OBJECT_EX, offsetof(FunctionObject, timeout), 0, NULL},
    {"errcheck", T_OBJECT_EX, offsetof(FunctionObject, errcheck), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static int function_traverse(FunctionObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->timeout);
    Py_VISIT(self->errcheck);
    Py_VISIT(self->helper);
    return 0;
}

static int function_clear(FunctionObject *self)
{
    Py_CLEAR(self->timeout);
    Py_CLEAR(self->errcheck);
    Py_CLEAR(self->helper);
    return 0;
}

static void function_dealloc(FunctionObject *self)
{
    PyObject_GC_UnTrack(self);
    function_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* _bind_fast(helper, fid, descriptor, library_timeout) */
static PyObject *function_bind(FunctionObject *self, PyObject *args)
{
    PyObject *helper, *desc;
    unsigned int fid;
    double lt;
    fastdesc d;
    if (!PyArg_ParseTuple(args, "O!IOd:_bind_fast", &Helper_Type, &helper, &fid, &desc, &lt))
        return NULL;
    if (fid & ADMIN_BIT) {
        PyErr_SetString(PyExc_ValueError, "bad function id");
        return NULL;
    }
    if (parse_desc(desc, &d, 4096) < 0) /* every slot has more than 4 KiB of payload */
        return NULL;
    self->desc = d;
    self->fid = fid;
    self->lib_timeout = lt;
    Py_INCREF(helper);
    Py_XSETREF(self->helper, (HelperObject *)helper);
    Py_RETURN_NONE;
}

static PyObject *function_unbind(FunctionObject *self, PyObject *noargs)
{
    (void)noargs;
    Py_CLEAR(self->helper);
    Py_RETURN_NONE;
}

static PyObject *function_fast_bound(FunctionObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->helper != NULL);
}

static PyObject *call_slow(PyObject *self, PyObject *args, PyObject *kw)
{
    if (!slow_call) {
        PyErr_SetString(PyExc_SystemError, "ffiguard isolate: no call hook");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (!kw && n < 16) {
        PyObject *stack[17];
        stack[0] = self;
        for (Py_ssize_t i = 0; i < n; i++)
            stack[i + 1] = PyTuple_GET_ITEM(args, i);
        return PyObject_Vectorcall(slow_call, stack, (size_t)n + 1, NULL);
    }
    PyObject *all = PyTuple_New(n + 1);
    if (!all)
        return NULL;
    PyTuple_SET_ITEM(all, 0, Py_NewRef(self));
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(all, i + 1, Py_NewRef(PyTuple_GET_ITEM(args, i)));
    PyObject *r = PyObject_Call(slow_call, all, kw);
    Py_DECREF(all);
    return r;
}

static PyObject *function_call(PyObject *op, PyObject *args, PyObject *kw)
{
    FunctionObject *self = (FunctionObject *)op;
    HelperObject *h = self->helper;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (!h || (kw && PyDict_GET_SIZE(kw)) || n != self->desc.nargs || !helper_usable(h))
        return call_slow(op, args, kw);
    /* Copies: another thread may rebind this function while the GIL is released. */
    const fastdesc dcopy = self->desc, *d = &dcopy;
    const uint32_t fid = self->fid;

    /* The arguments, before taking a slot: anything unusual goes the Python way. */
    union { unsigned char b[256]; uint64_t align; } req;
    memset(req.b, 0, d->argsize);
    int strict = d->flags & FD_STRICT;
    for (Py_ssize_t k = 0; k < n; k++)
        if (!pack_arg(d->code[k], strict, PyTuple_GET_ITEM(args, k), req.b + d->off[k]))
            return call_slow(op, args, kw);
    double timeout = self->lib_timeout;
    if (self->timeout && self->timeout != Py_None) {
        if (!PyFloat_CheckExact(self->timeout) && !PyLong_CheckExact(self->timeout))
            return call_slow(op, args, kw);
        timeout = PyFloat_AsDouble(self->timeout);
        if (timeout == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return call_slow(op, args, kw);
        }
    }
    long long deadline = 0;
    if (timeout != 0.0) {
        if (!(timeout > 0 && timeout < 1e9))
            return call_slow(op, args, kw);
        deadline = now_ns() + (long long)(timeout * 1e9);
    }
    PyObject *freelist = h->free;
    Py_ssize_t nfree;
    if (!freelist || !PyList_CheckExact(freelist) || (nfree = PyList_GET_SIZE(freelist)) == 0 ||
        !PyObject_TypeCheck(PyList_GET_ITEM(freelist, nfree - 1), &Slot_Type) ||
        !h->pid || !PyLong_CheckExact(h->pid))
        return call_slow(op, args, kw);
    PyObject *addr_obj = ((SlotObject *)PyList_GET_ITEM(freelist, nfree - 1))->addr;
    if (!addr_obj || !PyLong_CheckExact(addr_obj))
        return call_slow(op, args, kw);
    uintptr_t slot_addr = (uintptr_t)PyLong_AsUnsignedLongLong(addr_obj);
    long pid = PyLong_AsLong(h->pid);
    if (PyErr_Occurred() || !slot_addr || (slot_addr & 63)) {
        PyErr_Clear();
        return call_slow(op, args, kw);
    }
    Py_INCREF(h);
    SlotObject *slot = (SlotObject *)Py_NewRef(PyList_GET_ITEM(freelist, nfree - 1));
    PyObject *result = NULL;
    if (PyList_SetSlice(freelist, nfree - 1, nfree, NULL) < 0) {
        Py_DECREF(slot);
        Py_DECREF(h);
        return NULL;
    }

    unsigned char *base = (unsigned char *)slot_addr;
    unsigned char *payload = base + SLOT_HEAD;
    memcpy(payload, req.b, d->argsize);
    uint32_t head[3] = {fid, 0, d->argsize};
    memcpy(base + OFF_OP, head, sizeof head);
    int rc = run_exchange((slot_head *)base, ST_CALL, ST_CALL, deadline, (pid_t)pid);
    if (rc == ST_REPLY) {
        uint32_t status;
        memcpy(&status, base + OFF_STATUS, 4);
        if (status == 0) { /* OK; the result is where this side says, inside the slot */
            result = d->rescode ? unpack_value(d->rescode, payload + align16(d->argsize))
                                : Py_NewRef(Py_None);
            if (!result)
                goto fail_hook;
            int r;
            PyObject *freelist = h->free; /* (re-read: the GIL was released) */
            if (helper_waited_on(h) || !freelist || !PyList_CheckExact(freelist)) {
                /* someone waits for a slot (or retired the helper): Python's release */
                PyObject *x = PyObject_CallMethodObjArgs((PyObject *)h, str_release, (PyObject *)slot, NULL);
                r = x ? 0 : -1;
                Py_XDECREF(x);
            } else {
                r = PyList_Append(freelist, (PyObject *)slot);
            }
            if (r < 0)
                Py_CLEAR(result);
            Py_DECREF(slot);
            Py_DECREF(h);
            if (result && self->errcheck && self->errcheck != Py_None) {
                PyObject *checked = PyObject_CallFunctionObjArgs(self->errcheck, result, op, args, NULL);
                Py_DECREF(result);
                return checked;
            }
            return result;
        }
    }
fail_hook: {
        /* Not a plain success: the Python side makes the exception (and releases). */
        PyObject *exc_type = NULL, *exc_val = NULL, *exc_tb = NULL;
        PyObject *state;
        if (rc == RC_PYERR) {
            PyErr_Fetch(&exc_type, &exc_val, &exc_tb);
            state = Py_NewRef(Py_None);
        } else {
            if (PyErr_Occurred())
                PyErr_Fetch(&exc_type, &exc_val, &exc_tb);
            state = PyLong_FromLong(rc);
        }
        PyObject *size = PyLong_FromLong(d->argsize);
        PyObject *r = state && size && fast_fail
                          ? PyObject_CallFunctionObjArgs(fast_fail, op, (PyObject *)h, (PyObject *)slot,
                                                         state, args, size, NULL)
                          : NULL;
        Py_XDECREF(state);
        Py_XDECREF(size);
        Py_DECREF(slot);
        Py_DECREF(h);
        if (exc_type) { /* Ctrl-C (or a failed result conversion): that exception wins */
            Py_XDECREF(r);
            PyErr_Restore(exc_type, exc_val, exc_tb);
            return NULL;
        }
        return r;
    }
}

static PyMethodDef function_methods[] = {
    {"_bind_fast", (PyCFunction)function_bind, METH_VARARGS,
     "_bind_fast(helper, fid, descriptor, library_timeout): calls with these numbers take the C path"},
    {"_unbind_fast", (PyCFunction)function_unbind, METH_NOARGS, "forget the fast path"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef function_getset[] = {
    {"_fast_bound", (getter)function_fast_bound, NULL, "whether calls may take the C path", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject *function_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    (void)args, (void)kw;
    FunctionObject *self = (FunctionObject *)type->tp_alloc(type, 0);
    if (self) {
        self->timeout = Py_NewRef(Py_None);
        self->errcheck = Py_NewRef(Py_None);
    }
    return (PyObject *)self;
}

static PyTypeObject Function_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ffiguard._isolate.FunctionBase",
    .tp_doc = "IsolatedFunction's C base: the fast path for calls with number arguments.",
    .tp_basicsize = sizeof(FunctionObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = function_new,
    .tp_dealloc = (destructor)function_dealloc,
    .tp_traverse = (traverseproc)function_traverse,
    .tp_clear = (inquiry)function_clear,
    .tp_call = function_call,
    .tp_members = function_members,
    .tp_methods = function_methods,
    .tp_getset = function_getset,
};

static PyObject *set_hooks(PyObject *self, PyObject *args)
{
    PyObject *slow, *fail;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO:set_hooks", &slow, &fail))
        return NULL;
    Py_INCREF(slow);
    Py_INCREF(fail);
    Py_XSETREF(slow_call, slow);
    Py_XSETREF(fast_fail, fail);
    Py_RETURN_NONE;
}

/* ---- the helper's slot loop ----
 *
 * serve(slot_address, set_state, wait_while, table, limit) -> state
 *
 * Store set_state (if >= 0), wait while the state is wait_while, then serve requests
 * for functions whose table entry (table[fid]) is a (guarded function, descriptor)
 * tuple, replying to each and waiting for the next.  Returns the state CALL when a
 * request needs the Python path (an admin request, a function without an entry, a
 * request of another size, a negative pointer); raises the exception of a fast call
 * that failed (the request is then still unanswered: the caller replies).  The host's
 * lengths are not trusted: a fast request must have exactly its descriptor's size. */
static PyObject *serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long addr, set_state, wait_while, limit;
    (void)self;
    if (nargs != 5 || !PyList_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "serve(slot_address, set_state, wait_while, table, limit)");
        return NULL;
    }
    PyObject *table = args[3];
    if (as_ll(args[0], &addr) || as_ll(args[1], &set_state) || as_ll(args[2], &wait_while) ||
        as_ll(args[4], &limit))
        return NULL;
    if (!addr || (addr & 63) || limit < 4096) {
        PyErr_SetString(PyExc_ValueError, "serve(): bad slot");
        return NULL;
    }
    unsigned char *base = (unsigned char *)(uintptr_t)addr, *payload = base + SLOT_HEAD;
    slot_head *h = (slot_head *)base;
    for (;;) {
        int st = run_exchange(h, set_state, (uint32_t)wait_while, 0, 0);
        if (st == RC_PYERR)
            return NULL;
        set_state = -1;
        if (st != ST_CALL) { /* only the host moves a slot to CALL; anything else is noise */
            wait_while = st;
            continue;
        }
        uint32_t head[3];
        memcpy(head, base + OFF_OP, sizeof head);
        uint32_t op = head[0], req_len = head[2];
        if (op & ADMIN_BIT || (Py_ssize_t)op >= PyList_GET_SIZE(table))
            return PyLong_FromLong(st);
        PyObject *entry = PyList_GET_ITEM(table, (Py_ssize_t)op);
        fastdesc d;
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2 ||
            parse_desc(PyTuple_GET_ITEM(entry, 1), &d, limit) < 0) {
            PyErr_Clear();
            return PyLong_FromLong(st);
        }
        if (req_len != d.argsize)
            return PyLong_FromLong(st);
        union { unsigned char b[256]; uint64_t align; } req;
        memcpy(req.b, payload, d.argsize); /* read the host's bytes once */
        PyObject *stack[FAST_MAXARGS];
        int k;
        for (k = 0; k < d.nargs; k++) {
            if (d.code[k] == 'P') {
                int64_t v;
                memcpy(&v, req.b + d.off[k], 8);
                if (v < 0)
                    break; /* an offset into the slot: the Python path resolves it */
            }
            stack[k] = unpack_value(d.code[k], req.b + d.off[k]);
            if (!stack[k])
                break;
        }
        if (k < d.nargs) {
            for (int j = 0; j < k; j++)
                Py_DECREF(stack[j]);
            if (PyErr_Occurred())
                return NULL;
            return PyLong_FromLong(st);
        }
        PyObject *fn = PyTuple_GET_ITEM(entry, 0);
        Py_INCREF(fn);
        PyObject *r = PyObject_Vectorcall(fn, stack, (size_t)d.nargs, NULL);
        Py_DECREF(fn);
        for (k = 0; k < d.nargs; k++)
            Py_DECREF(stack[k]);
        if (!r)
            return NULL;
        uint32_t rep[2] = {0, 0}; /* status OK, rep_len */
        if (d.rescode) {
            int ok = pack_result(d.rescode, r, payload + align16(d.argsize));
            Py_DECREF(r);
            if (ok < 0)
                return NULL;
            rep[1] = (uint32_t)code_size(d.rescode);
        } else {
            Py_DECREF(r);
        }
        memcpy(base + OFF_STATUS, &rep[0], 4);
        memcpy(base + OFF_REP_LEN, &rep[1], 4);
        set_state = ST_REPLY;
        wait_while = ST_REPLY;
    }
}

/* configure(side, spin_ns, spin_limit, slice_ns, leases_address=0)
 * leases_address: (MAX_LEASES + 32) * 8 bytes of shared memory (0: private to this
 * process): the spin leases and the count of calls in flight. */
static PyObject *configure(PyObject *self, PyObject *args)
{
    int s, limit;
    long long spin, slice;
    unsigned long long where = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "iLiL|K:configure", &s, &spin, &limit, &slice, &where))
        return NULL;
    if ((s != 0 && s != 1) || spin < 0 || limit < 0 || limit > MAX_LEASES || slice <= 0 ||
        (where & 7)) {
        PyErr_SetString(PyExc_ValueError, "configure(): bad arguments");
        return NULL;
    }
    side = s;
    leases = where ? (_Atomic long long *)(uintptr_t)where : local_leases;
    inflight = (_Atomic int *)&leases[MAX_LEASES + 16];
    spin_ns = spin;
    atomic_store(&spin_cur, spin);
    spin_limit = limit;
    slice_ns = slice;
    Py_RETURN_NONE;
}

static PyObject *counters(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    return Py_BuildValue("{sKsKsKsKsL}", "spin_hits", (unsigned long long)atomic_load(&n_spin_hits),
                         "sleeps", (unsigned long long)atomic_load(&n_sleeps), "wakes",
                         (unsigned long long)atomic_load(&n_wakes), "no_lease",
                         (unsigned long long)atomic_load(&n_no_lease), "spin_budget_ns",
                         (long long)atomic_load(&spin_cur));
}

/* map_shared(fd, size, address=0) -> address: mmap(MAP_SHARED) of fd, read-write; at
 * exactly `address` (MAP_FIXED_NOREPLACE, never replacing a mapping) when it is not 0. */
static PyObject *map_shared(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long size, address = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "iK|K:map_shared", &fd, &size, &address))
        return NULL;
    int flags = MAP_SHARED | (address ? MAP_FIXED_NOREPLACE : 0);
    void *p = mmap((void *)(uintptr_t)address, (size_t)size, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (p == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (address && (uintptr_t)p != (uintptr_t)address) { /* a kernel without NOREPLACE */
        munmap(p, (size_t)size);
        errno = EEXIST;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)p);
}

static PyObject *unmap(PyObject *self, PyObject *args)
{
    unsigned long long address, size;
    (void)self;
    if (!PyArg_ParseTuple(args, "KK:unmap", &address, &size))
        return NULL;
    if (munmap((void *)(uintptr_t)address, (size_t)size) == -1)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"exchange", (PyCFunction)(void (*)(void))exchange, METH_FASTCALL,
     "exchange(slot_address, set_state, wait_while, deadline_ns=0, pid=0) -> state"},
    {"configure", configure, METH_VARARGS, "configure(side, spin_ns, spin_limit, slice_ns)"},
    {"counters", counters, METH_NOARGS, "spin hits, futex sleeps and wakes in this process"},
    {"map_shared", map_shared, METH_VARARGS, "map_shared(fd, size, address=0) -> address"},
    {"unmap", unmap, METH_VARARGS, "unmap(address, size)"},
    {"set_hooks", set_hooks, METH_VARARGS, "set_hooks(slow_call, fast_fail): the host's Python paths"},
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL,
     "serve(slot_address, set_state, wait_while, table, limit) -> state (the helper's fast loop)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ffiguard._isolate",
    "Shared-memory call slots for ffiguard's isolate mode (futex + bounded spinning).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__isolate(void)
{
    if (PyType_Ready(&Slot_Type) < 0 || PyType_Ready(&Helper_Type) < 0 ||
        PyType_Ready(&Function_Type) < 0)
        return NULL;
    if (!str_release && !(str_release = PyUnicode_InternFromString("release")))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddObject(m, "Slot", Py_NewRef((PyObject *)&Slot_Type)) ||
              PyModule_AddObject(m, "HelperBase", Py_NewRef((PyObject *)&Helper_Type)) ||
              PyModule_AddObject(m, "FunctionBase", Py_NewRef((PyObject *)&Function_Type)) ||
              PyModule_AddIntConstant(m, "FAST_MAXARGS", FAST_MAXARGS) ||
              PyModule_AddIntConstant(m, "TIMEOUT", RC_TIMEOUT) ||
              PyModule_AddIntConstant(m, "DEAD", RC_DEAD) ||
              PyModule_AddIntConstant(m, "MAX_LEASES", MAX_LEASES))) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
