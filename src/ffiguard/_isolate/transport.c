/* ffiguard._isolate: the synchronous shared-memory transport of isolate mode.
 *
 * A call slot is a small header in memory shared by the host and the helper process
 * (see ffiguard/isolate/_wire.py for the layout).  Its first word is the slot's state
 * and the futex both sides sleep on; the next two words say whether the host (0) or
 * the helper (1) is asleep on it, so that the other side only makes the FUTEX_WAKE
 * system call when somebody actually sleeps.
 *
 * exchange() (and the fast path of host_fast.c and helper_loop.c, which uses the same
 * wait) is the hot part: optionally store a new state (and wake the peer if it sleeps),
 * then wait, with the GIL released, until the state is no longer `wait_while`: first
 * spinning for a bounded time (only if this process has fewer than `spin_limit`
 * threads spinning right now: on one CPU spinning only steals the peer's time; see the
 * leases below), then sleeping on the futex.  The host sleeps in slices and checks
 * between them whether the helper died (waitid with WNOWAIT, the zombie is left for
 * the Python side to reap) and whether its deadline passed.
 *
 * Everything in shared memory may have been scribbled on by a misbehaving helper:
 * this code only ever compares the state word, never trusts it for memory accesses.
 */
#include "isolate.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

/* Per process: which side this is and how long to spin.  Who may spin is decided by
 * leases in memory shared by the host and all its helpers (the first page of the
 * foreign heap): at most spin_limit threads of the host and its helpers together spin
 * at any moment (CPUs - 1, so the thread doing the work always has a CPU).  A lease is
 * the CLOCK_MONOTONIC time its spinner stops; a lease left behind by a killed helper
 * simply expires. */
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
static _Atomic unsigned long long n_spin_hits, n_sleeps, n_wakes, n_no_lease;
/* Adaptive spin budget (per process): halved each time a spin ends without an answer
 * (a slow call, or the peer waiting for the CPU this thread is spinning on: the
 * scheduler may put both on one CPU when the machine is busy), doubled on success,
 * between SPIN_FLOOR and spin_ns. */
#define SPIN_FLOOR 20000LL
static _Atomic long long spin_cur;

long long now_ns(void)
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


/* One exchange with the GIL released, the host's count of calls in flight kept, and
 * signals handled (a handler that raises ends the wait: RC_PYERR). */
int run_exchange(slot_head *h, long long set_state, uint32_t wait_while, long long deadline,
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
PyObject *exchange(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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

/* configure(side, spin_ns, spin_limit, slice_ns, leases_address=0)
 * leases_address: (MAX_LEASES + 32) * 8 bytes of shared memory (0: private to this
 * process): the spin leases and the count of calls in flight. */
PyObject *configure(PyObject *self, PyObject *args)
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

PyObject *counters(PyObject *self, PyObject *noargs)
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
PyObject *map_shared(PyObject *self, PyObject *args)
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

PyObject *unmap(PyObject *self, PyObject *args)
{
    unsigned long long address, size;
    (void)self;
    if (!PyArg_ParseTuple(args, "KK:unmap", &address, &size))
        return NULL;
    if (munmap((void *)(uintptr_t)address, (size_t)size) == -1)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}
