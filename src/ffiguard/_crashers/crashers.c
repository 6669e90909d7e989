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
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
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

/* Unbounded recursion (the compiler cannot prove it: `forever` could change); the
 * volatile buffer keeps every frame on the stack. */
static volatile int forever = 1;

FAULTY int ffg_recurse(int depth)
{
    volatile char pad[256];
    pad[0] = (char)depth;
    if (!forever)
        return pad[0];
    return ffg_recurse(depth + 1) + pad[0];
}

FAULTY int ffg_call_null(void)
{
    int (*volatile fn)(void) = NULL;
    return fn();
}

FAULTY int ffg_raise(int signum) { return raise(signum); }

/* ---- well-behaved functions -------------------------------------------------- */

EXPORT void ffg_noop(void) {}

/* Wraps around like the hardware (computed unsigned: no undefined behaviour). */
EXPORT int ffg_add(int a, int b) { return (int)((unsigned)a + (unsigned)b); }

EXPORT int ffg_fill(int *out, int value)
{
    *out = value;
    return 1;
}

/* Calls back into the host: returns cb(x) + 1. */
EXPORT int ffg_call_callback(int (*cb)(int), int x) { return cb(x) + 1; }

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

/* ---- the extension module itself (nothing to call from Python) --------------- */

static struct PyModuleDef crashers_module = {
    PyModuleDef_HEAD_INIT, "ffiguard._crashers",
    "Deliberate faults for ffiguard's demo and tests: load with ctypes.CDLL(__file__).",
    -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__crashers(void)
{
    PyObject *m = PyModule_Create(&crashers_module);
#ifdef Py_GIL_DISABLED
    /* Loaded through ctypes, not imported, by ffiguard; if someone imports it, it has
     * no state at all: it needs no GIL on a free-threaded interpreter. */
    if (m && PyUnstable_Module_SetGIL(m, Py_MOD_GIL_NOT_USED) < 0)
        Py_CLEAR(m);
#endif
    return m;
}
