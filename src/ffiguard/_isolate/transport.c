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
/* Written by configure() while other threads may be waiting in do_exchange: atomics
 * (relaxed: each is a setting read on its own; nothing else depends on their order). */
static _Atomic int side;                /* 0 host, 1 helper */
static _Atomic long long spin_ns;       /* 0: never spin */
static _Atomic int spin_limit;          /* at most this many spinners (<= MAX_LEASES) */
static _Atomic long long slice_ns = 5000000; /* host: check the helper's liveness this often */
static const long long grace_ns = 5000;      /* how long to try for a lease held by the peer */
#define FFG_LEASE_WORDS (MAX_LEASES + 32)    /* the leases, then the in-flight count */
#define FFG_INFLIGHT_WORD (MAX_LEASES + 16)
static _Atomic long long local_leases[FFG_LEASE_WORDS];
static _Atomic(_Atomic long long *) leases = local_leases;
/* Calls in flight from the host to all its helpers (same shared page, after the
 * leases): nobody spins while more than one call is in flight, since then the
 * threads doing the work need every CPU and spinning only delays them.  A call is
 * counted by the slot it runs on, from its first CALL until the slot is given back to
 * the pool (host_fast.c: ffg_slot_begin_call, the pool's give), whatever happened in
 * between (a reply, a fault, a timeout, an exception in a callback). */
static _Atomic(_Atomic int *) inflight = (_Atomic int *)&local_leases[FFG_INFLIGHT_WORD];
static _Atomic unsigned long long n_spin_hits, n_sleeps, n_wakes, n_no_lease;
/* Adaptive spin budget (per process): halved each time a spin ends without an answer
 * (a slow call, or the peer waiting for the CPU this thread is spinning on: the
 * scheduler may put both on one CPU when the machine is busy), doubled on success,
 * between SPIN_FLOOR and spin_ns. */
#define SPIN_FLOOR 20000LL
static _Atomic long long spin_cur;

_Atomic int *ffg_inflight_counter(void)
{
    return atomic_load_explicit(&inflight, memory_order_acquire);
}

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

/* A state word seen: the state itself, or RC_PROTOCOL for a value that is no state
 * (the raw value goes to *raw either way). */
static inline int ffg_classify(uint32_t s, uint32_t *raw)
{
    *raw = s;
    return s <= ST_MAX ? (int)s : RC_PROTOCOL;
}

static int do_exchange(slot_head *h, long long set_state, uint32_t wait_while,
                       long long deadline, pid_t pid, uint32_t *raw)
{
    const int me = atomic_load_explicit(&side, memory_order_relaxed), peer = 1 - me;
    const long long spin = atomic_load_explicit(&spin_ns, memory_order_relaxed);
    const int limit = atomic_load_explicit(&spin_limit, memory_order_relaxed);
    const long long slice = atomic_load_explicit(&slice_ns, memory_order_relaxed);
    _Atomic long long *const lease_words = atomic_load(&leases);
    _Atomic int *const in_flight = ffg_inflight_counter();
    uint32_t s;

    if (set_state >= 0) {
        atomic_store(&h->state, (uint32_t)set_state);
        if (atomic_load(&h->sleeping[peer]))
            futex_wake(&h->state);
    }

    if (spin > 0 && limit > 0 && atomic_load(in_flight) <= 1) {
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
                    atomic_compare_exchange_strong(&lease_words[held], &mine, 0);
                }
                atomic_fetch_add_explicit(&n_spin_hits, 1, memory_order_relaxed);
                if (budget < spin)
                    atomic_store_explicit(&spin_cur, budget * 2 > spin ? spin : budget * 2,
                                          memory_order_relaxed);
                return ffg_classify(s, raw);
            }
            if (held < 0) {
                /* Take a free or expired lease; the peer that just handed this slot
                 * over is about to give its lease up, hence the grace period. */
                long long t = (i & 15) == 1 ? now_ns() : start;
                for (int k = 0; k < limit; k++) {
                    long long v = atomic_load(&lease_words[k]);
                    if ((v == 0 || v < t) && atomic_compare_exchange_strong(&lease_words[k], &v, lease)) {
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
                if (atomic_load(in_flight) > 1)
                    break;
            }
        }
        if (held >= 0) {
            long long mine = lease;
            atomic_compare_exchange_strong(&lease_words[held], &mine, 0);
        }
    }

    atomic_fetch_add_explicit(&n_sleeps, 1, memory_order_relaxed);
    for (;;) {
        struct timespec ts, *tp = NULL;
        long long wait = -1;
        if (pid > 0)
            wait = slice;
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
            return ffg_classify(s, raw);
        }
        long r = futex_wait(&h->state, wait_while, tp);
        int err = errno;
        atomic_store(&h->sleeping[me], 0);
        s = atomic_load(&h->state);
        if (s != wait_while)
            return ffg_classify(s, raw);
        if (r == -1 && err == EINTR && me == 0)
            return RC_INTERRUPTED;
        if (pid > 0 && peer_dead(pid)) {
            s = atomic_load(&h->state); /* it may have answered just before dying */
            return s != wait_while ? ffg_classify(s, raw) : RC_DEAD;
        }
        if (deadline && now_ns() >= deadline)
            return RC_TIMEOUT;
    }
}


/* One exchange with the GIL released (detached from the interpreter: free-threaded
 * builds let other threads run Python meanwhile) and signals handled (a handler that
 * raises ends the wait: RC_PYERR).  *raw: the state word's value when a state (or
 * RC_PROTOCOL) is returned. */
int run_exchange(slot_head *h, long long set_state, uint32_t wait_while, long long deadline,
                 pid_t pid, uint32_t *raw)
{
    int rc;
    *raw = wait_while;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = do_exchange(h, set_state, wait_while, deadline, pid, raw);
        Py_END_ALLOW_THREADS
        if (rc != RC_INTERRUPTED)
            break;
        if (PyErr_CheckSignals() < 0)
            return RC_PYERR;
        set_state = -1;
    }
    return rc;
}

/* exchange(slot, set_state, wait_while, deadline_ns=0, pid=0) -> int
 *
 * slot: a Slot (the host: a CALL stored makes the call count as in flight until the
 * slot goes back to its pool) or a slot's address (the helper).  set_state < 0: store
 * nothing.  deadline_ns: CLOCK_MONOTONIC (time.monotonic_ns()), 0 for none.  pid > 0:
 * the helper to watch.  Returns the new state, or TIMEOUT when the deadline passed,
 * DEAD when the helper died, PROTOCOL when the state word holds no state.  A signal
 * handler that raises (Ctrl-C) ends the wait with that exception. */
PyObject *exchange(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long addr, set_state, wait_while, deadline = 0, pid = 0;
    (void)self;
    if (nargs < 3 || nargs > 5) {
        PyErr_SetString(PyExc_TypeError, "exchange() takes 3 to 5 arguments");
        return NULL;
    }
    if (as_ll(args[1], &set_state) || as_ll(args[2], &wait_while) ||
        (nargs > 3 && as_ll(args[3], &deadline)) || (nargs > 4 && as_ll(args[4], &pid)))
        return NULL;
    if (ffg_slot_check(args[0]))
        addr = (long long)(set_state == ST_CALL ? ffg_slot_begin_call(args[0])
                                                : ffg_slot_address(args[0]));
    else if (as_ll(args[0], &addr))
        return NULL;
    if (!addr || (addr & 63)) {
        PyErr_SetString(PyExc_ValueError, "exchange(): bad slot address");
        return NULL;
    }
    uint32_t raw;
    int rc = run_exchange((slot_head *)(uintptr_t)addr, set_state, (uint32_t)wait_while, deadline,
                          (pid_t)pid, &raw);
    if (rc == RC_PYERR)
        return NULL;
    return PyLong_FromLong(rc);
}

/* configure(side, spin_ns, spin_limit, slice_ns, leases_address=0)
 * leases_address: FFG_LEASE_WORDS * 8 bytes of shared memory (0: private to this
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
    _Atomic long long *words = where ? (_Atomic long long *)(uintptr_t)where : local_leases;
    atomic_store(&side, s);
    atomic_store(&leases, words);
    atomic_store(&inflight, (_Atomic int *)&words[FFG_INFLIGHT_WORD]);
    atomic_store(&spin_ns, spin);
    atomic_store(&spin_cur, spin);
    atomic_store(&spin_limit, limit);
    atomic_store(&slice_ns, slice);
    Py_RETURN_NONE;
}

PyObject *counters(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    return Py_BuildValue("{sKsKsKsKsLsi}", "spin_hits", (unsigned long long)atomic_load(&n_spin_hits),
                         "sleeps", (unsigned long long)atomic_load(&n_sleeps), "wakes",
                         (unsigned long long)atomic_load(&n_wakes), "no_lease",
                         (unsigned long long)atomic_load(&n_no_lease), "spin_budget_ns",
                         (long long)atomic_load(&spin_cur), "inflight",
                         atomic_load(ffg_inflight_counter()));
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
