/* Other people's signal handlers, for tests/test_chaining.py (compiled there with the
 * system C compiler into a temporary directory).
 *
 * Each group below installs a handler the way a kind of real library does, so that the
 * tests can check ffiguard behaves towards it exactly as the kernel would without
 * ffiguard:
 *
 *   rt_*      a runtime that handles faults in memory it owns (a WebAssembly engine's
 *             guard pages, a JIT's, a GC's write tracking): a PROT_NONE page whose
 *             faults it recovers from itself, by making the page writable and
 *             returning (RT_REPAIR) or by siglongjmp back into rt_touch (RT_JUMP).
 *             Any other fault goes to the handler it found installed.
 *   probe_*   a memory prober: reads an address, escaping a fault with siglongjmp.
 *   once_*    a one-shot handler (SA_RESETHAND) that reports itself and returns.
 *   abort_*   a SIGSEGV handler that calls abort(); mark_* a SIGABRT handler that
 *             reports itself and returns.
 *   nest_*    a handler that probes memory itself while handling a fault (SA_NODEFER):
 *             it is re-entered, and the inner call escapes with siglongjmp. With
 *             nest_init(1) it is also the SIGABRT handler, and for any signal but
 *             a fault on its page it probes, then swallows the signal.
 *   mask_*    a handler that reports which signals are blocked while it runs.
 *
 * Reports are written with write(2) to stderr, from the handlers: async-signal-safe.
 */
#define _GNU_SOURCE 1
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default"), noinline))
#define RT_REPAIR 0
#define RT_JUMP 1
#define STDERR 2
/* Thread-local state read in a signal handler: initial-exec, so no lazy allocation;
 * the jump-buffer pointers are volatile, or the compiler drops their stores. */
#define TLS __thread __attribute__((tls_model("initial-exec")))

static void say(const char *s) { (void)!write(STDERR, s, strlen(s)); }

/* Hand a signal that is not ours to what was installed before us, as runtimes do:
 * call a handler, or put back the default/ignore disposition and return, so that the
 * fault happens again under it (a sent signal is sent again). */
static void pass_on(const struct sigaction *saved, int signo, siginfo_t *si, void *uc)
{
    if (saved->sa_flags & SA_SIGINFO) {
        saved->sa_sigaction(signo, si, uc);
    } else if (saved->sa_handler == SIG_DFL || saved->sa_handler == SIG_IGN) {
        sigaction(signo, saved, NULL);
        if (si->si_code <= 0)
            raise(signo);
    } else {
        saved->sa_handler(signo);
    }
}

static int install(int signo, void (*fn)(int, siginfo_t *, void *), int flags, struct sigaction *saved)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = fn;
    sa.sa_flags = SA_SIGINFO | flags;
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, saved);
}

/* ---- a runtime that owns a region ---------------------------------------------- */

static char *rt_region;
static size_t rt_page;
static int rt_mode;
static volatile long rt_faults;
static struct sigaction rt_saved;
static TLS sigjmp_buf *volatile rt_env; /* set while rt_touch runs in RT_JUMP mode */

static void rt_handler(int signo, siginfo_t *si, void *uc)
{
    char *a = si->si_addr;
    if (si->si_code > 0 && rt_region && a >= rt_region && a < rt_region + rt_page) {
        rt_faults++;
        if (rt_mode == RT_JUMP && rt_env)
            siglongjmp(*rt_env, 1);
        mprotect(rt_region, rt_page, PROT_READ | PROT_WRITE);
        return;
    }
    pass_on(&rt_saved, signo, si, uc);
}

/* Map the region and install the handler (SA_ONSTACK | SA_NODEFER, as wasmtime does). */
EXPORT int rt_init(int mode)
{
    rt_mode = mode;
    rt_page = (size_t)sysconf(_SC_PAGESIZE);
    rt_region = mmap(NULL, rt_page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (rt_region == MAP_FAILED)
        return -1;
    return install(SIGSEGV, rt_handler, SA_ONSTACK | SA_NODEFER, &rt_saved);
}

/* Write value into the region, which faults (it is PROT_NONE again each time): returns
 * what the region then holds (RT_REPAIR), or -1 after the jump back (RT_JUMP). */
EXPORT int rt_touch(int value)
{
    sigjmp_buf env;
    mprotect(rt_region, rt_page, PROT_NONE);
    if (rt_mode == RT_JUMP) {
        if (sigsetjmp(env, 1)) {
            rt_env = NULL;
            return -1;
        }
        rt_env = &env;
    }
    *(volatile int *)rt_region = value;
    rt_env = NULL;
    return *(volatile int *)rt_region;
}

/* Write tracking: n writes, each to a page made read-only again first, so each one
 * faults once and is repaired (RT_REPAIR). Returns the writes that completed. */
EXPORT long rt_track_writes(long n)
{
    long done = 0;
    for (long i = 0; i < n; i++) {
        mprotect(rt_region, rt_page, PROT_READ);
        *(volatile long *)rt_region = i; /* the same instruction and address each time */
        done++;
    }
    return done;
}

EXPORT long rt_faults_seen(void) { return rt_faults; }

/* ---- a prober that escapes with siglongjmp -------------------------------------- */

static struct sigaction probe_saved;
static TLS sigjmp_buf *volatile probe_env;

static void probe_handler(int signo, siginfo_t *si, void *uc)
{
    if (probe_env)
        siglongjmp(*probe_env, 1);
    pass_on(&probe_saved, signo, si, uc);
}

/* Installed without SA_NODEFER: SIGSEGV is blocked in the handler, and sigsetjmp(env, 1)
 * puts the mask back on the way out. */
EXPORT int probe_init(void) { return install(SIGSEGV, probe_handler, 0, &probe_saved); }

/* 1 when address can be read, 0 when reading it faults. */
EXPORT int probe_readable(uintptr_t address)
{
    sigjmp_buf env;
    if (sigsetjmp(env, 1)) {
        probe_env = NULL;
        return 0;
    }
    probe_env = &env;
    (void)*(volatile char *)address;
    probe_env = NULL;
    return 1;
}

/* ---- a one-shot handler --------------------------------------------------------- */

static void once_handler(int signo, siginfo_t *si, void *uc)
{
    (void)signo, (void)si, (void)uc;
    say("one-shot handler\n");
}

EXPORT int once_init(int signo) { return install(signo, once_handler, SA_RESETHAND, NULL); }

/* ---- abort() from a SIGSEGV handler; a SIGABRT handler that reports ------------- */

static void abort_handler(int signo, siginfo_t *si, void *uc)
{
    (void)signo, (void)si, (void)uc;
    say("segv handler calls abort\n");
    abort();
}

EXPORT int abort_init(void) { return install(SIGSEGV, abort_handler, 0, NULL); }

static void mark_handler(int signo, siginfo_t *si, void *uc)
{
    (void)signo, (void)si, (void)uc;
    say("abrt handler ran\n");
}

EXPORT int mark_init(void) { return install(SIGABRT, mark_handler, 0, NULL); }

/* ---- a handler that is re-entered: it probes memory itself while handling -------- */

static char *nest_page;
static size_t nest_size;
static int nest_any; /* probe while handling any other signal, and swallow it */
static volatile long nest_calls;
static struct sigaction nest_saved;
static TLS sigjmp_buf *volatile nest_env; /* set while the handler probes */

/* SA_NODEFER: its own probe's fault re-enters it, and that inner call jumps back out. */
static void nest_handler(int signo, siginfo_t *si, void *uc)
{
    nest_calls++;
    if (nest_env)
        siglongjmp(*nest_env, 1);
    char *a = si->si_addr;
    int mine = si->si_code > 0 && a >= nest_page && a < nest_page + nest_size;
    if (mine || nest_any) {
        sigjmp_buf env;
        if (sigsetjmp(env, 0) == 0) {
            nest_env = &env;
            (void)*(volatile char *)16; /* faults: the inner call jumps back here */
        }
        nest_env = NULL;
        if (mine)
            mprotect(nest_page, nest_size, PROT_READ | PROT_WRITE);
        return;
    }
    pass_on(&nest_saved, signo, si, uc);
}

EXPORT int nest_init(int any)
{
    nest_any = any;
    nest_size = (size_t)sysconf(_SC_PAGESIZE);
    nest_page = mmap(NULL, nest_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (nest_page == MAP_FAILED)
        return -1;
    if (any && install(SIGABRT, nest_handler, SA_NODEFER, NULL) != 0)
        return -1;
    return install(SIGSEGV, nest_handler, SA_NODEFER, &nest_saved);
}

/* Write to the page, made PROT_NONE first: the handler is called twice (the fault, then
 * its own probe's). */
EXPORT int nest_touch(int value)
{
    mprotect(nest_page, nest_size, PROT_NONE);
    *(volatile int *)nest_page = value;
    return *(volatile int *)nest_page;
}

EXPORT long nest_calls_seen(void) { return nest_calls; }

/* ---- a handler that reports the mask it runs with, then exits ------------------- */

static void mask_handler(int signo)
{
    sigset_t now;
    char line[] = "mask: segv=? usr1=? usr2=?\n";
    (void)signo;
    pthread_sigmask(SIG_BLOCK, NULL, &now);
    line[11] = (char)('0' + sigismember(&now, SIGSEGV));
    line[18] = (char)('0' + sigismember(&now, SIGUSR1));
    line[25] = (char)('0' + sigismember(&now, SIGUSR2));
    say(line);
    _exit(3);
}

/* A plain (not SA_SIGINFO) SIGSEGV handler whose sa_mask is {SIGUSR1}. */
EXPORT int mask_init(int nodefer)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = mask_handler;
    sa.sa_flags = nodefer ? SA_NODEFER : 0;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGUSR1);
    return sigaction(SIGSEGV, &sa, NULL);
}
