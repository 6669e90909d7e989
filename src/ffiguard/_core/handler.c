/* The fault handlers.
 *
 * EVERYTHING IN THIS FILE THAT RUNS IN A SIGNAL HANDLER IS ASYNC-SIGNAL-SAFE: no malloc,
 * no stdio, no locks, no Python API except PyGILState_Check (see guarded_frame). It
 * reads and writes only the faulting thread's own mmap'd state, the saved signal
 * context, and atomic counters. Unwinding uses libgcc's unwinder, which with
 * glibc >= 2.35 finds unwind tables through _dl_find_object, lock-free; a fault inside
 * the unwinder itself is escaped with siglongjmp (see capture_pcs). The module is
 * linked with -z now, so no lazy symbol binding happens in here.
 *
 * A fault is recovered only when all of these hold: the faulting thread is inside a
 * guarded call (its guard stack has a frame), the fault is not in the thunk itself,
 * the signal was caused by the thread (a CPU fault, or the thread's own raise/abort,
 * not a kill from elsewhere), and the thread is not running Python code (a callback
 * called from the foreign function). Anything else goes to the handler that was
 * installed before ours, or to the default action, as if ffiguard were not loaded.
 */
#define _GNU_SOURCE 1
#include <Python.h>

#include "state.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <unwind.h>

#define NSIGNALS 65

static struct sigaction previous[NSIGNALS]; /* what was installed before us, kept current */
static volatile sig_atomic_t trapped[NSIGNALS];
static uint64_t recovered[NSIGNALS]; /* atomic counters */
/* Whether the last recorded SIGSEGV/SIGBUS with an address had its access kind in the
 * saved context: always on x86-64 (page-fault error code); on AArch64 only with an ESR
 * record, which qemu-user never writes. -1 before the first such fault. */
static int access_in_context = -1;

/* Chaining bookkeeping, for every thread (also those without guard state). */
static __thread int chaining __attribute__((tls_model("initial-exec")));
static __thread struct {
    int signo;
    uintptr_t pc, address;
    uint64_t returned_ns; /* when the previous handler last returned for it */
    unsigned repeats;     /* the same fault again, each soon after that return */
} last_chained __attribute__((tls_model("initial-exec")));

/* A previous handler that returns for the same fault this many times in a row, each
 * time within STALE_WINDOW_NS, is taken to be doing nothing (faulthandler's handler
 * once faulthandler is disabled behind our back, e.g. at interpreter exit): the fault
 * then takes the default action instead of looping forever. A handler that really
 * repairs a fault (a GC's write barrier) re-faults at the same place only as often as
 * the program makes it. */
#define STALE_REPEATS 10000
#define STALE_WINDOW_NS 1000000

static uint64_t monotonic_ns(void) /* clock_gettime is async-signal-safe */
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int in_thunk(uintptr_t pc)
{
#ifdef FFG_NO_ARCH
    (void)pc;
    return 0;
#else
    return pc >= (uintptr_t)&ffg_thunk && pc < (uintptr_t)&ffg_thunk_end;
#endif
}

/* The innermost guard frame when this fault belongs to a guarded foreign call, else NULL.
 * PyGILState_Check is a lock-free read on CPython 3.9-3.13 (the GIL holder's thread
 * state against this thread's, through pthread_getspecific). The GIL is released
 * during a guarded call and re-taken by a Python callback: holding it means Python
 * code is running, so the fault is not the foreign function's. Where the check is
 * disabled (sub-interpreters) it answers 1 and we fail safe: no recovery. */
static struct ffg_frame *guarded_frame(struct ffg_thread *t, const siginfo_t *si, const ucontext_t *uc)
{
    if (!t || t->top <= t->frames || t->top > t->end)
        return NULL;
    if (si->si_code <= 0 && !(si->si_code == SI_TKILL && si->si_pid == getpid()))
        return NULL; /* sent by another process, or process-directed */
    if (in_thunk(ffg_uc_pc(uc)))
        return NULL;
    if (PyGILState_Check())
        return NULL;
    return t->top - 1;
}

/* A SIGSEGV just below the stack pointer, with the stack nearly used up, is the stack
 * running out (SEGV_MAPERR past the main thread's stack, SEGV_ACCERR on a thread's
 * guard page). */
static int is_stack_overflow(const struct ffg_thread *t, const struct ffg_fault *r)
{
    if (r->signo != SIGSEGV || !r->has_address)
        return 0;
    uintptr_t a = r->address, sp = r->sp;
    if (a + 65536 < sp || a > sp + 4096)
        return 0;
    return !t->stack_lo || sp < t->stack_lo + 256 * 1024 || a < t->stack_lo;
}

static _Unwind_Reason_Code unwind_step(struct _Unwind_Context *ctx, void *arg)
{
    struct ffg_fault *r = arg;
    int before_insn = 0;
    uintptr_t ip = (uintptr_t)_Unwind_GetIPInfo(ctx, &before_insn);
    if (r->npcs == 0) {
        /* Skip this handler's own frames: the faulting frame is the one the signal
         * frame resumes, at exactly the saved pc. */
        if (!(before_insn && ip == r->pc))
            return _URC_NO_REASON;
    }
    if (in_thunk(ip)) /* the foreign call's caller: the end of the foreign frames */
        return _URC_END_OF_STACK;
    r->pcs[r->npcs++] = ip;
    return r->npcs < FFG_MAX_PCS ? _URC_NO_REASON : _URC_END_OF_STACK;
}

/* Raw return addresses of the foreign frames, innermost first; symbolized later, in
 * normal context. A corrupt stack can make the unwinder itself fault: the handler
 * runs with SA_NODEFER, so that fault re-enters it, sees t->unwinding and jumps back
 * here with what was collected so far. */
static void capture_pcs(struct ffg_thread *t, struct ffg_fault *r, const ucontext_t *uc)
{
    r->npcs = 0;
    t->unwinding = 1;
    if (sigsetjmp(t->unwind_escape, 0) == 0)
        _Unwind_Backtrace(unwind_step, r);
    t->unwinding = 0;
    if (r->npcs == 0)
        r->pcs[r->npcs++] = r->pc; /* no unwind info at all for the pc */
    if (r->npcs == 1 && r->access == FFG_ACCESS_EXEC) {
        /* A call to a bad address (e.g. through NULL): the unwinder knows nothing of
         * the pc, but the call left its return address where the architecture keeps it
         * (x86-64: on top of the stack; AArch64: in x30). */
        uintptr_t ret = ffg_uc_call_return(uc, t->stack_lo, t->stack_hi);
        if (ret)
            r->pcs[r->npcs++] = ret;
    }
}

/* Under AddressSanitizer, the frames a recovery skips leave their stack red zones
 * poisoned (ASan's own longjmp interceptor clears them; a context redirect does not),
 * and the next calls on that stack would trip over them. The weak reference is NULL
 * in normal builds. Clearing shadow memory is a plain store: safe here. */
extern void __asan_unpoison_memory_region(void const volatile *addr, size_t size) __attribute__((weak));

static void unpoison_skipped_stack(uintptr_t fault_sp, uintptr_t frame_sp)
{
    uintptr_t lo = fault_sp - FFG_RED_ZONE; /* a leaf function may use memory below sp */
    if (__asan_unpoison_memory_region && lo < frame_sp)
        __asan_unpoison_memory_region((void *)lo, frame_sp - lo);
}

static void record(struct ffg_thread *t, const struct ffg_frame *f, int signo, const siginfo_t *si,
                   const ucontext_t *uc)
{
    struct ffg_fault *r = &t->fault;
    r->token = 0;
    r->signo = signo;
    r->code = si->si_code;
    r->has_address = si->si_code > 0; /* caused by an instruction: si_addr is meaningful */
    r->address = r->has_address ? (uintptr_t)si->si_addr : 0;
    r->pc = ffg_uc_pc(uc);
    r->sp = ffg_uc_sp(uc);
    /* Only a fault caused by an instruction has a meaningful trap number/error code. */
    r->access = FFG_ACCESS_UNKNOWN;
    if (r->has_address && (signo == SIGSEGV || signo == SIGBUS)) {
        int from_context;
        r->access = ffg_uc_access(uc, r->address, &from_context);
        __atomic_store_n(&access_in_context, from_context, __ATOMIC_RELAXED);
    }
    ffg_uc_regs(uc, r->regs);
    r->stack_overflow = is_stack_overflow(t, r);
    capture_pcs(t, r, uc);
    __atomic_fetch_add(&recovered[signo], 1, __ATOMIC_RELAXED);
    __atomic_store_n(&r->token, f->token, __ATOMIC_RELEASE); /* now the caller may read it */
}

/* Let the default action happen: for a fault, returning re-runs the instruction, which
 * faults again; a sent signal (abort's raise) is sent again. */
static void die(int signo, const siginfo_t *si)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(signo, &dfl, NULL);
    if (si->si_code <= 0)
        raise(signo);
}

/* Not ours: behave as the previous handler would have. It is called as the kernel
 * would call it (its mask, this signal blocked unless it asked for SA_NODEFER). A
 * handler that re-raises (faulthandler does) ends in the default action; so does one
 * that keeps returning without acting (see STALE_REPEATS): never an endless loop. */
static void chain(int signo, siginfo_t *si, ucontext_t *uc)
{
    struct sigaction prev = previous[signo];
    uintptr_t pc = ffg_uc_pc(uc), address = (uintptr_t)si->si_addr;
    int same = last_chained.signo == signo && last_chained.pc == pc && last_chained.address == address;
    if (same && monotonic_ns() - last_chained.returned_ns < STALE_WINDOW_NS)
        last_chained.repeats++;
    else
        last_chained.repeats = 0;

    if (chaining || last_chained.repeats >= STALE_REPEATS || prev.sa_handler == SIG_DFL) {
        die(signo, si);
        return;
    }
    if (prev.sa_handler == SIG_IGN) {
        if (si->si_code > 0) /* an ignored fault would only fault again */
            die(signo, si);
        return;
    }
    last_chained.signo = signo;
    last_chained.pc = pc;
    last_chained.address = address;

    sigset_t mask = prev.sa_mask, saved, pending;
    if (!(prev.sa_flags & SA_NODEFER))
        sigaddset(&mask, signo);
    pthread_sigmask(SIG_BLOCK, &mask, &saved);
    chaining = 1;
    if (prev.sa_flags & SA_SIGINFO)
        prev.sa_sigaction(signo, si, uc);
    else
        prev.sa_handler(signo);
    chaining = 0;
    last_chained.returned_ns = monotonic_ns();
    if (sigpending(&pending) == 0 && sigismember(&pending, signo))
        die(signo, si); /* it re-raised: let that one take the default action */
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
}

static void on_signal(int signo, siginfo_t *si, void *context)
{
    int saved_errno = errno;
    ucontext_t *uc = context;
    struct ffg_thread *t = ffg_tls;

    if (t && t->unwinding)
        siglongjmp(t->unwind_escape, 1); /* our own unwinder faulted: see capture_pcs */

    /* An untrapped signal still reaches us while another handler installed on top of
     * ours chains to us: pass it on. */
    struct ffg_frame *f = (chaining || !trapped[signo]) ? NULL : guarded_frame(t, si, uc);
    if (f) {
        record(t, f, signo, si, uc);
        unpoison_skipped_stack(ffg_uc_sp(uc), f->sp);
        ffg_uc_recover(uc, f, (uintptr_t)&ffg_thunk_recover);
        /* sigreturn restores this mask: never leave a trapped signal blocked. */
        for (int s = 1; s < NSIGNALS; s++)
            if (trapped[s])
                sigdelset(&uc->uc_sigmask, s);
    } else {
        chain(signo, si, uc);
    }
    errno = saved_errno;
}

/* ---- installing (normal context) --------------------------------------------------- */

static void ours(struct sigaction *sa)
{
    memset(sa, 0, sizeof *sa);
    sa->sa_sigaction = on_signal;
    sa->sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa->sa_mask);
}

int ffg_handlers_install(const int *signals, int n)
{
    struct sigaction sa, old;
    ours(&sa);
    for (int i = 0; i < n; i++) {
        int s = signals[i];
        if (s <= 0 || s >= NSIGNALS) {
            errno = EINVAL;
            return -1;
        }
        if (sigaction(s, &sa, &old) != 0)
            return -1;
        if (old.sa_sigaction != on_signal)
            previous[s] = old;
        trapped[s] = 1;
    }
    return 0;
}

/* Stop trapping a signal: put back what was installed before us if ours is on top;
 * if another handler has replaced ours since, it keeps chaining to us and we pass the
 * signal on. */
int ffg_handlers_untrap(int s)
{
    struct sigaction cur;
    if (s <= 0 || s >= NSIGNALS) {
        errno = EINVAL;
        return -1;
    }
    if (!trapped[s])
        return 0;
    trapped[s] = 0;
    if (sigaction(s, NULL, &cur) == 0 && cur.sa_sigaction == on_signal)
        return sigaction(s, &previous[s], NULL);
    return 0;
}

/* Put our handler back on top of whatever replaced it, chaining to that. Returns how
 * many signals needed it. */
int ffg_handlers_refresh(void)
{
    struct sigaction sa, cur;
    int changed = 0;
    ours(&sa);
    for (int s = 1; s < NSIGNALS; s++) {
        if (!trapped[s] || sigaction(s, NULL, &cur) != 0 || cur.sa_sigaction == on_signal)
            continue;
        previous[s] = cur;
        sigaction(s, &sa, NULL);
        changed++;
    }
    return changed;
}

int ffg_is_trapped(int signo) { return signo > 0 && signo < NSIGNALS && trapped[signo]; }

uint64_t ffg_recovered_count(int signo)
{
    if (signo > 0 && signo < NSIGNALS)
        return __atomic_load_n(&recovered[signo], __ATOMIC_RELAXED);
    uint64_t total = 0;
    for (int s = 1; s < NSIGNALS; s++)
        total += __atomic_load_n(&recovered[s], __ATOMIC_RELAXED);
    return total;
}

size_t ffg_prev_snapshot(void *buf, size_t size)
{
    if (buf && size >= sizeof previous)
        memcpy(buf, previous, sizeof previous);
    return sizeof previous;
}

void ffg_prev_restore(const void *buf) { memcpy(previous, buf, sizeof previous); }

int ffg_access_in_context(void) { return __atomic_load_n(&access_in_context, __ATOMIC_RELAXED); }
