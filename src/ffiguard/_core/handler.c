/* The fault handlers.
 *
 * EVERYTHING IN THIS FILE THAT RUNS IN A SIGNAL HANDLER IS ASYNC-SIGNAL-SAFE: no malloc,
 * no stdio, no locks, no Python API (the interpreter's thread state is only read, with
 * plain loads: pyhost.h). It reads and writes only the faulting thread's own mmap'd
 * state, the saved signal context, and atomic counters. The backtrace comes from our
 * own unwinder (unwind.c), which takes no lock and checks its reads; a fault inside it
 * is still escaped with siglongjmp (see capture_pcs). The module is linked with -z now,
 * so no lazy symbol binding happens in here.
 *
 * A fault is recovered only when all of these hold: the faulting thread is inside a
 * guarded call (its guard stack has a live frame), the fault is not in the thunk
 * itself, the signal was caused by the thread (a CPU fault, or the thread's own
 * raise/abort: not a kill from another thread or process), no Python code is running
 * on the thread, and the interpreter stands exactly where it stood when that call was
 * armed (no Python callback, nor anything it called, lies between the fault and the
 * guard frame). Anything else goes to the handler that was installed before ours, or to
 * the default action, as if ffiguard were not loaded (chain.c).
 */
#define _GNU_SOURCE 1
#include <Python.h>

#include "state.h"
#include "pyhost.h"
#include "shield.h" /* shield (issue 13) */

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static uint64_t ffg_recovered[FFG_NSIGNALS]; /* atomic counters */
/* Whether the last recorded SIGSEGV/SIGBUS with an address had its access kind in the
 * saved context: always on x86-64 (page-fault error code); on AArch64 only with an ESR
 * record, which qemu-user never writes. -1 before the first such fault. */
static int ffg_access_ctx = -1;
static uint64_t ffg_unwind_escape_count; /* atomic: faults inside the unwinder, escaped (see capture_pcs) */

static int ffg_in_thunk(uintptr_t pc)
{
#ifdef FFG_NO_ARCH
    (void)pc;
    return 0;
#else
    return pc >= (uintptr_t)&ffg_thunk && pc < (uintptr_t)&ffg_thunk_end;
#endif
}

#if PY_VERSION_HEX >= 0x030C0000
#define FFG_ATTACHED_IS_THIS_THREAD 1 /* ffg_py_attached() is this thread's own or NULL */
#else
#define FFG_ATTACHED_IS_THIS_THREAD 0 /* it is the GIL holder's, of any thread */
#endif

/* Whether the signal is this thread's own doing: caused by an instruction, or sent by
 * the thread to itself (raise, abort, a failed assert) — not a kill from another process
 * nor a pthread_kill from another thread (a watchdog asking for a core dump). */
static int ffg_self_inflicted(int signo, const siginfo_t *si, const ucontext_t *uc)
{
    if (si->si_code > 0)
        return 1;
    pid_t pid = getpid();
    if (si->si_code != SI_TKILL || si->si_pid != pid)
        return 0;
    return ffg_uc_self_sent(uc, signo, pid, (pid_t)syscall(SYS_gettid), (size_t)sysconf(_SC_PAGESIZE));
}

/* The guard frame this fault belongs to, else NULL: the innermost live frame whose
 * interpreter position (struct ffg_host) is the thread state's now. A Python callback
 * running inside the call has moved it (another Python frame, deeper recursion), and so
 * has anything the callback called, even with the GIL released; a greenlet switched in
 * has its own. Python code running right now (the thread attached to the interpreter)
 * is never the foreign code's. */
static struct ffg_frame *ffg_position_frame(struct ffg_thread *t, const ucontext_t *uc);

static struct ffg_frame *ffg_guarded_frame(struct ffg_thread *t, int signo, const siginfo_t *si,
                                           const ucontext_t *uc)
{
    if (!t || t->top <= t->frames + 1 || t->top > t->end)
        return NULL;
    if (!ffg_self_inflicted(signo, si, uc))
        return NULL;
    return ffg_position_frame(t, uc);
}

/* The guarded call whose own foreign code the thread is running, by the interpreter
 * position (see above), else NULL. Also asked for an interruption (issue 16), which is
 * never self-inflicted. */
static struct ffg_frame *ffg_position_frame(struct ffg_thread *t, const ucontext_t *uc)
{
    if (!t || t->top <= t->frames + 1 || t->top > t->end || ffg_in_thunk(ffg_uc_pc(uc)))
        return NULL;
    PyThreadState *attached = ffg_py_attached();
    if (attached && FFG_ATTACHED_IS_THIS_THREAD)
        return NULL;
    for (struct ffg_frame *f = t->top - 1; f > t->frames; f--) {
        PyThreadState *ts = (PyThreadState *)(uintptr_t)f->host.ts;
        if (f->token == 0 || !ts)
            continue; /* returned (out of order, greenlets) */
        if (attached == ts)
            return NULL;
        if (ffg_py_frame(ts) == f->host.frame && ffg_py_depth(ts) == f->host.depth)
            return f;
    }
    return NULL;
}

/* A free slot for the fault's record, or NULL when FFG_MAX_PENDING faults already wait
 * (then the fault is not recovered: there is nowhere to say what happened). */
static struct ffg_fault *ffg_free_record(struct ffg_thread *t)
{
    for (int i = 0; i < FFG_MAX_PENDING; i++)
        if (__atomic_load_n(&t->faults[i].token, __ATOMIC_ACQUIRE) == 0)
            return &t->faults[i];
    return NULL;
}

/* A SIGSEGV just below the stack pointer, with the stack nearly used up, is the stack
 * running out (SEGV_MAPERR past the main thread's stack, SEGV_ACCERR on a thread's
 * guard page). */
static int ffg_is_stack_overflow(const struct ffg_thread *t, const struct ffg_fault *r)
{
    if (r->signo != SIGSEGV || !r->has_address)
        return 0;
    uintptr_t a = r->address, sp = r->sp;
    if (a + 65536 < sp || a > sp + 4096)
        return 0;
    return !t->stack_lo || sp < t->stack_lo + 256 * 1024 || a < t->stack_lo;
}

/* Raw return addresses of the foreign frames, innermost first; symbolized later, in
 * normal context. Our own unwinder (unwind.c) takes no lock and reads the stack only
 * between the fault's sp (less the red zone) and the guard frame's sp, within the
 * thread's stack. A read it cannot check (unwind tables of a library another thread
 * unmaps right now) could still fault: the handler runs with SA_NODEFER, so that fault
 * re-enters it, sees t->unwinding and jumps back here with what was collected so far
 * (nothing is left locked: the unwinder holds no lock). */
static int ffg_walk_into(const struct ffg_thread *t, const struct ffg_frame *f, const ucontext_t *uc,
                         int bad_call, uintptr_t *pcs, int max, volatile int *npcs)
{
    uintptr_t sp = ffg_uc_sp(uc);
    uintptr_t lo = sp - FFG_RED_ZONE, hi = f->sp;
    if (lo > sp)
        lo = 0; /* sp within the red zone of address 0: nothing to read anyway */
    if (t->stack_hi) {
        lo = lo > t->stack_lo ? lo : t->stack_lo;
        hi = hi < t->stack_hi ? hi : t->stack_hi;
    }
    return ffg_unwind(uc, lo, hi, bad_call, pcs, max, npcs);
}

static void ffg_walk(const struct ffg_thread *t, const struct ffg_frame *f, struct ffg_fault *r,
                 const ucontext_t *uc)
{
    ffg_walk_into(t, f, uc, r->access == FFG_ACCESS_EXEC, r->pcs, FFG_MAX_PCS, &r->npcs);
}

/* interrupt (issue 16): whether every frame between the interrupted code and the guard
 * frame is known (the walk reached the thunk) and none is the host's own machinery
 * (the interpreter, ctypes, cffi, libffi: a callback entering or leaving Python, e.g.
 * holding the GIL's mutex in take_gil). Unknown frames (no unwind information, code in
 * no ELF object such as libffi's closure trampolines, deeper than FFG_INTR_WALK_MAX)
 * count as "not known to be foreign": the stop waits. Signal handler. */
#define FFG_INTR_WALK_MAX 1024 /* frames: 8 KiB of the alternate signal stack */

static int ffg_only_foreign_frames(struct ffg_thread *t, const struct ffg_frame *f, const ucontext_t *uc)
{
    uintptr_t pcs[FFG_INTR_WALK_MAX];
    volatile int n = 0;
    volatile int complete = 0;
    t->unwinding = 1;
    if (sigsetjmp(t->unwind_escape, 0) == 0)
        complete = ffg_walk_into(t, f, uc, 0, pcs, FFG_INTR_WALK_MAX, &n);
    t->unwinding = 0;
    if (!complete)
        return 0;
    for (int i = 0; i < n; i++)
        if (ffg_intr_in_host(pcs[i]))
            return 0;
    return 1;
}

static void ffg_capture_pcs(struct ffg_thread *t, const struct ffg_frame *f, struct ffg_fault *r,
                        const ucontext_t *uc)
{
    r->npcs = 0;
    t->unwinding = 1;
    if (sigsetjmp(t->unwind_escape, 0) == 0)
        ffg_walk(t, f, r, uc);
    else
        __atomic_fetch_add(&ffg_unwind_escape_count, 1, __ATOMIC_RELAXED);
    t->unwinding = 0;
    if (r->npcs == 0)
        r->pcs[r->npcs++] = r->pc;
}

/* Under AddressSanitizer, the frames a recovery skips leave their stack red zones
 * poisoned (ASan's own longjmp interceptor clears them; a context redirect does not),
 * and the next calls on that stack would trip over them. The weak reference is NULL
 * in normal builds. Clearing shadow memory is a plain store: safe here. */
extern void __asan_unpoison_memory_region(void const volatile *addr, size_t size) __attribute__((weak));

#define FFG_UNPOISON_MAX ((uintptr_t)1 << 30) /* no thread stack is larger: beyond, sp was wild */

static void ffg_unpoison_skipped_stack(uintptr_t fault_sp, uintptr_t frame_sp)
{
    const struct ffg_thread *t = ffg_tls;
    uintptr_t lo = fault_sp - FFG_RED_ZONE; /* a leaf function may use memory below sp */
    if (lo > fault_sp)
        lo = 0;
    /* A wild sp (foreign code that corrupted it) must not make us clear the shadow of
     * terabytes: only the thread's own stack holds skipped frames. */
    if (t && t->stack_hi && lo < t->stack_lo)
        lo = t->stack_lo;
    if (__asan_unpoison_memory_region && lo < frame_sp && frame_sp - lo <= FFG_UNPOISON_MAX)
        __asan_unpoison_memory_region((void *)lo, frame_sp - lo);
}

static void ffg_record(struct ffg_thread *t, struct ffg_fault *r, const struct ffg_frame *f, int signo,
                       const siginfo_t *si, const ucontext_t *uc)
{
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
        __atomic_store_n(&ffg_access_ctx, from_context, __ATOMIC_RELAXED);
    }
    ffg_uc_regs(uc, r->regs);
    r->stack_overflow = ffg_is_stack_overflow(t, r);
    ffg_capture_pcs(t, f, r, uc);
    __atomic_fetch_add(&ffg_recovered[signo], 1, __ATOMIC_RELAXED);
    __atomic_store_n(&r->token, f->token, __ATOMIC_RELEASE); /* now the caller may read it */
    __atomic_fetch_add(&t->npending, 1, __ATOMIC_RELEASE);
}

/* interrupt (issue 16): stop the guarded call with this token, as a fault is recovered,
 * if the thread is running that call's own foreign code (ffg_position_frame: never
 * Python code, never a callback or anything it calls) and no previous handler we
 * called is running. The record says signo (SIGINT, or the interrupt signal for a
 * timeout) and code, and no fault address. 1 if stopped, 0 if not now. Signal handler. */
int ffg_stop_call(struct ffg_thread *t, uint64_t token, int signo, int code, ucontext_t *uc)
{
    if (!t || t->unwinding || ffg_chain_busy(uc))
        return 0;
    struct ffg_frame *f = ffg_position_frame(t, uc);
    if (!f || f->token != token)
        return 0;
    struct ffg_fault *r = ffg_free_record(t);
    if (!r)
        return 0;
    if (!ffg_only_foreign_frames(t, f, uc))
        return 0;
    siginfo_t si;
    memset(&si, 0, sizeof si);
    si.si_signo = signo;
    si.si_code = code;
    ffg_record(t, r, f, signo, &si, uc);
    r->has_address = 0; /* a sent signal: no fault address (SI_KERNEL's code is positive) */
    r->address = 0;
    ffg_unpoison_skipped_stack(ffg_uc_sp(uc), f->sp);
    ffg_uc_recover(uc, f, ffg_shield_resume(f));
    uc->uc_sigmask = t->host_mask;
    return 1;
}

void ffg_on_signal(int signo, siginfo_t *si, void *context)
{
    int saved_errno = errno;
    ucontext_t *uc = context;
    struct ffg_thread *t = ffg_tls;

    if (t && t->unwinding)
        siglongjmp(t->unwind_escape, 1); /* our own unwinder faulted: see capture_pcs */
    /* interrupt (issue 16): SIGINT (chained to Python's handler first) and the interrupt
     * signal are never faults (interrupt.c). */
    if ((signo == SIGINT || signo == ffg_intr_signo) && ffg_intr_on_signal(signo, si, uc)) {
        errno = saved_errno;
        return;
    }

    /* A signal while a previous handler we called is running is that handler's business
     * (chain.c), never a guarded call's. */
    struct ffg_frame *f = ffg_chain_busy(uc) ? NULL : ffg_guarded_frame(t, signo, si, uc);
    /* shield (issue 13): shielded memory touched outside guarded foreign code is opened
     * for the toucher (in the saved context) and the access runs again. */
    if (ffg_shield_fixup(signo, si, uc, f != NULL)) {
        errno = saved_errno;
        return;
    }
    /* An untrapped signal still reaches us while another handler installed on top of
     * ours chains to us: pass it on. */
    if (!ffg_trapped[signo])
        f = NULL;
    struct ffg_fault *r = f ? ffg_free_record(t) : NULL;
    if (r) {
        ffg_record(t, r, f, signo, si, uc);
        ffg_unpoison_skipped_stack(ffg_uc_sp(uc), f->sp);
        ffg_uc_recover(uc, f, ffg_shield_resume(f)); /* shield: its own return path restores PKRU */
        /* sigreturn restores this mask: the one the call started with, not whatever the
         * foreign code had blocked when it faulted (SIGINT, say). */
        uc->uc_sigmask = t->host_mask;
    } else {
        ffg_shield_before_chain(); /* shield: open ffiguard's keys for the previous handler */
        ffg_chain(signo, si, uc);
    }
    errno = saved_errno;
}

uint64_t ffg_recovered_count(int signo)
{
    if (signo > 0 && signo < FFG_NSIGNALS)
        return __atomic_load_n(&ffg_recovered[signo], __ATOMIC_RELAXED);
    uint64_t total = 0;
    for (int s = 1; s < FFG_NSIGNALS; s++)
        if (s != SIGINT && s != ffg_intr_signo) /* interrupt (issue 16): stops are not faults */
            total += __atomic_load_n(&ffg_recovered[s], __ATOMIC_RELAXED);
    return total;
}

uint64_t ffg_unwind_escapes(void) { return __atomic_load_n(&ffg_unwind_escape_count, __ATOMIC_RELAXED); }

int ffg_access_in_context(void) { return __atomic_load_n(&ffg_access_ctx, __ATOMIC_RELAXED); }
