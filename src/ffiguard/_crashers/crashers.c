/* Deliberate faults of every kind, and a few well-behaved functions with awkward
 * signatures, for `python -m ffiguard demo`, the tests and the benchmark.
 *
 * Built as a Python extension only so that `pip install .` ships it; Python code
 * loads it with ctypes.CDLL(path) and calls the ffg_* functions directly. Every
 * access that must fault goes through a volatile pointer so the compiler keeps it
 * exactly where the source puts it.
 */
#include <Python.h>

#include <assert.h>
#include <setjmp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default"), noinline))
/* The faulting functions do undefined things on purpose: exempt them from UBSan
 * (tools/sanitize builds everything else with it). */
#define FAULTY EXPORT __attribute__((no_sanitize("undefined")))

/* ---- faults ---------------------------------------------------------------- */

FAULTY int ffg_read_at(uintptr_t address) { return *(volatile int *)address; }

FAULTY void ffg_write_at(uintptr_t address, int value) { *(volatile int *)address = value; }

FAULTY int ffg_read_null(void) { return ffg_read_at(0); }

FAULTY void ffg_write_null(void) { ffg_write_at(0, 1); }

/* A page mapped PROT_READ, made once: writing it gives SEGV_ACCERR at its address. */
FAULTY uintptr_t ffg_readonly_page(void)
{
    static void *page;
    if (!page) {
        page = mmap(NULL, (size_t)sysconf(_SC_PAGESIZE), PROT_READ,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (page == MAP_FAILED)
            page = NULL;
    }
    return (uintptr_t)page;
}

/* Maps two pages of `fd` (a file shorter than one page) and reads the second:
 * SIGBUS, BUS_ADRERR, at the address stored in *where before the read. */
FAULTY int ffg_read_past_eof(int fd, uintptr_t *where)
{
    long pagesize = sysconf(_SC_PAGESIZE);
    char *map = mmap(NULL, 2 * (size_t)pagesize, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return -1;
    *where = (uintptr_t)(map + pagesize);
    return *(volatile char *)(map + pagesize);
}

/* SIGILL: an undefined instruction. x86-64: ud2 (what __builtin_trap emits there).
 * AArch64: udf #0 (__builtin_trap would emit brk, a breakpoint: SIGTRAP, not SIGILL). */
FAULTY void ffg_illegal_instruction(void)
{
#if defined(__aarch64__)
    __asm__ volatile("udf #0");
#else
    __builtin_trap();
#endif
}

/* SIGFPE, FPE_INTDIV on x86-64 when b == 0. AArch64's sdiv does not trap: it returns 0
 * (the tests check that, and test a SIGFPE the foreign code raises instead). */
FAULTY int ffg_divide(int a, int b)
{
    volatile int x = a, y = b;
    return x / y;
}

FAULTY void ffg_abort(void) { abort(); }

FAULTY int ffg_assert_positive(int x)
{
    assert(x > 0);
    return x;
}

/* Unbounded recursion (the compiler cannot prove it: `ffg_forever` could change); the
 * volatile buffer keeps every frame on the stack. */
static volatile int ffg_forever = 1;

FAULTY int ffg_recurse(int depth)
{
    volatile char pad[256];
    pad[0] = (char)depth;
    if (!ffg_forever)
        return pad[0];
    return ffg_recurse(depth + 1) + pad[0];
}

FAULTY int ffg_call_null(void)
{
    int (*volatile fn)(void) = NULL;
    return fn();
}

FAULTY int ffg_raise(int signum) { return raise(signum); }

/* Blocks `signum` in this thread (as a library guarding a critical section might),
 * then reads address 0. */
FAULTY int ffg_block_and_fault(int signum)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signum);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    return ffg_read_at(0);
}

/* Calls back into the host, then reads the address the callback returned. */
FAULTY int ffg_call_then_read(uintptr_t (*cb)(void)) { return ffg_read_at(cb()); }

/* ---- well-behaved functions -------------------------------------------------- */

EXPORT void ffg_noop(void) {}

/* Wraps around like the hardware (computed unsigned: no undefined behaviour). */
EXPORT int ffg_add(int a, int b) { return (int)((unsigned)a + (unsigned)b); }

EXPORT int ffg_fill(int *out, int value)
{
    *out = value;
    return 1;
}

/* Busy for `ms` milliseconds of wall time, in foreign code (no system call but the
 * clock's, which is a vDSO call). */
EXPORT int ffg_spin_ms(int ms)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    long spins = 0;
    do {
        spins++;
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000 < ms);
    return spins > 0;
}

/* Calls back into the host: returns cb(x) + 1. */
EXPORT int ffg_call_callback(int (*cb)(int), int x) { return cb(x) + 1; }

/* shield: a SIGSEGV handler (installed before ffiguard's, so ffiguard chains to it) that
 * reads one byte at an address, prints "=<byte>" and exits 3: can a previous handler
 * read shielded memory? */
static volatile uintptr_t ffg_reader_address;

static void ffg_reader_handler(int signo)
{
    (void)signo;
    char line[3] = {'=', *(volatile char *)ffg_reader_address, '\n'};
    if (write(1, line, sizeof line) < 0)
        _exit(4);
    _exit(3);
}

EXPORT int ffg_install_reader_handler(uintptr_t address)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = ffg_reader_handler;
    ffg_reader_address = address;
    return sigaction(SIGSEGV, &sa, NULL);
}

/* shield: a write after a callback returned (is the memory locked again?) */
FAULTY void ffg_call_then_write(int (*cb)(int), uintptr_t address, int value)
{
    cb(0);
    ffg_write_at(address, value);
}

/* Eight ints (two of them on the stack on x86-64) and four doubles, each weighted
 * differently so that a misplaced argument changes the result. */
EXPORT double ffg_mix12(int a, int b, int c, int d, int e, int f, int g, int h,
                        double w, double x, double y, double z)
{
    return a * 1 + b * 2 + c * 3 + d * 4 + e * 5 + f * 6 + g * 7 + h * 8 +
           w * 9 + x * 10 + y * 11 + z * 12;
}

/* Variadic: n longs / n doubles (the latter needs %al set by the caller). */
EXPORT long ffg_vsum(int n, ...)
{
    va_list ap;
    long total = 0;
    va_start(ap, n);
    for (int i = 0; i < n; i++)
        total += va_arg(ap, long) * (i + 1);
    va_end(ap);
    return total;
}

EXPORT double ffg_vsumd(int n, ...)
{
    va_list ap;
    double total = 0;
    va_start(ap, n);
    for (int i = 0; i < n; i++)
        total += va_arg(ap, double) * (i + 1);
    va_end(ap);
    return total;
}

struct ffg_point { int x, y; };
struct ffg_big { long a, b, c, d; };

/* Small struct in registers, large struct through a hidden pointer. */
EXPORT struct ffg_point ffg_make_point(int x, int y)
{
    struct ffg_point p = {x, y};
    return p;
}

EXPORT int ffg_point_sum(struct ffg_point p) { return p.x * 1000 + p.y; }

EXPORT struct ffg_big ffg_make_big(long base)
{
    struct ffg_big b = {base, base + 1, base + 2, base + 3};
    return b;
}

/* ---- hangs (interrupt, issue 16): each runs until ffiguard stops it ------------ */

/* Spins forever (no system call): only a signal can stop it. */
EXPORT void ffg_spin_forever(void)
{
    for (;;)
        __asm__ volatile("" ::: "memory");
}

/* Blocks in read() on a pipe nobody writes (the write end stays open). */
EXPORT long ffg_block_in_read(void)
{
    static int fds[2] = {-1, -1};
    if (fds[0] < 0 && pipe(fds) != 0)
        return -1;
    char byte;
    return (long)read(fds[0], &byte, 1);
}

/* sleep(3600). */
EXPORT unsigned ffg_sleep_long(void)
{
    enum { AN_HOUR = 3600 };
    return sleep(AN_HOUR);
}

/* Takes a mutex and spins holding it: stopped there, the mutex stays locked and the
 * next call deadlocks (what on_fault="quarantine" is for). */
static pthread_mutex_t ffg_hang_lock = PTHREAD_MUTEX_INITIALIZER;

EXPORT void ffg_spin_holding_lock(void)
{
    pthread_mutex_lock(&ffg_hang_lock);
    for (;;)
        __asm__ volatile("" ::: "memory");
}

/* Sleeps about `us` microseconds (nanosleep, resumed when a signal interrupts it) and
 * returns 0; for timeouts that must not fire. */
EXPORT int ffg_sleep_us(long us)
{
    enum { NS_PER_US = 1000, NS_PER_S = 1000000000 };
    struct timespec left = {.tv_sec = us * NS_PER_US / NS_PER_S, .tv_nsec = us * NS_PER_US % NS_PER_S};
    while (nanosleep(&left, &left) != 0)
        ;
    return 0;
}

/* One nanosleep of `us` microseconds: -1 when a signal interrupted it (a stray signal). */
EXPORT int ffg_nanosleep_once(long us)
{
    enum { NS_PER_US = 1000, NS_PER_S = 1000000000 };
    struct timespec t = {.tv_sec = us * NS_PER_US / NS_PER_S, .tv_nsec = us * NS_PER_US % NS_PER_S};
    return nanosleep(&t, NULL);
}

/* Calls cb(i) for i = 0, 1, ... until it returns non-zero, spinning `spin` iterations
 * between calls (time in foreign code); returns that i. */
EXPORT int ffg_callback_loop(int (*cb)(int), long spin)
{
    int i = 0;
    for (;; i++) {
        for (volatile long k = 0; k < spin; k++)
            ;
        if (cb(i))
            return i;
    }
}

/* ---- the benchmark's baseline: a bare sigsetjmp/siglongjmp fault -> exception --------
 * What a minimal setjmp-based guard costs (cysignals' sig_on/sig_off without its extras):
 * sigsetjmp(env, 0), a NULL read, a SIGSEGV handler that siglongjmps back, then a Python
 * exception. No address, no registers, no backtrace. The handler is installed only
 * around the benchmark's timed loop (baseline_install / baseline_restore), so ffiguard's
 * stays in place for everything else. Single-threaded use only. */

static sigjmp_buf ffg_baseline_env;
static struct sigaction ffg_baseline_saved;
static PyObject *ffg_baseline_error;

static void ffg_baseline_handler(int signo, siginfo_t *si, void *context)
{
    (void)si, (void)context;
    siglongjmp(ffg_baseline_env, signo); /* async-signal-safe: the jump is all it does */
}

static PyObject *ffg_baseline_install(PyObject *module, PyObject *noargs)
{
    (void)module, (void)noargs;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = ffg_baseline_handler;
    /* SA_NODEFER: the jump leaves the handler without sigreturn, so SIGSEGV must not be
     * blocked while it runs (sigsetjmp(env, 0) does not save or restore the mask). */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &ffg_baseline_saved) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *ffg_baseline_restore(PyObject *module, PyObject *noargs)
{
    (void)module, (void)noargs;
    if (sigaction(SIGSEGV, &ffg_baseline_saved, NULL) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *ffg_baseline_read_null(PyObject *module, PyObject *noargs)
{
    (void)module, (void)noargs;
    if (sigsetjmp(ffg_baseline_env, 0) == 0) {
        ffg_read_null();
        Py_RETURN_NONE;
    }
    PyErr_SetString(ffg_baseline_error, "Segmentation fault");
    return NULL;
}

static PyMethodDef ffg_crashers_methods[] = {
    {"baseline_install", ffg_baseline_install, METH_NOARGS,
     "install the baseline's SIGSEGV handler (a bare siglongjmp), saving the current one"},
    {"baseline_restore", ffg_baseline_restore, METH_NOARGS, "put back the SIGSEGV handler saved by baseline_install"},
    {"baseline_read_null", ffg_baseline_read_null, METH_NOARGS,
     "sigsetjmp, read NULL, siglongjmp back from the handler, raise BaselineFault (needs baseline_install)"},
    {NULL, NULL, 0, NULL},
};

/* ---- the extension module itself ------------------------------------------------- */

static struct PyModuleDef ffg_crashers_module = {
    PyModuleDef_HEAD_INIT, "ffiguard._crashers",
    "Deliberate faults for ffiguard's demo and tests: load with ctypes.CDLL(__file__).\n"
    "Its Python functions are the benchmark's bare sigsetjmp/siglongjmp baseline.",
    -1, ffg_crashers_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__crashers(void)
{
    PyObject *m = PyModule_Create(&ffg_crashers_module);
#ifdef Py_GIL_DISABLED
    /* Loaded through ctypes, not imported, by ffiguard; if someone imports it, it has
     * no state at all: it needs no GIL on a free-threaded interpreter. */
    if (m && PyUnstable_Module_SetGIL(m, Py_MOD_GIL_NOT_USED) < 0)
        Py_CLEAR(m);
#endif
    if (!m)
        return NULL;
    ffg_baseline_error = PyErr_NewException("ffiguard._crashers.BaselineFault", NULL, NULL);
    if (!ffg_baseline_error) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(ffg_baseline_error); /* the module keeps one reference, this file the other */
    if (PyModule_AddObject(m, "BaselineFault", ffg_baseline_error) < 0) {
        Py_DECREF(ffg_baseline_error);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
