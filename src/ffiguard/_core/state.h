/* Per-thread guard state, the fault record, and the interfaces between the C files.
 *
 * A thread's state is one mmap'd block (never the Python heap, never malloc, so the
 * signal handler may read and write it) reached through one initial-exec TLS pointer,
 * ffg_tls, which the assembly thunk reads too. The first fields are at fixed
 * offsets the thunk uses (T_TOP, T_END, T_ARMED, T_TOKEN, T_HOST in arch/<arch>.S).
 *
 * Each arch/<arch>.h provides: struct ffg_frame and its F_* offsets, FRAME_SIZE,
 * FFG_ARCH_NAME, FFG_NREGS and FFG_REG_NAMES, FFG_RED_ZONE, FFG_STUB_SIZE and
 * ffg_write_stub (the only machine code written from C), and the signal-context
 * accessors ffg_uc_pc/sp/regs/access/recover, and the unwinder's register numbering and
 * ffg_unw_* rules (async-signal-safe).
 *
 * Arming names the target, not just "the next stub": between arming and the foreign
 * call, ctypes converts the arguments, which can run Python code that calls some other
 * stubbed function directly; that call must not take the guard meant for this one.
 */
#ifndef FFG_STATE_H
#define FFG_STATE_H

#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>
#include <ucontext.h>

/* For the unwinder's reads of other frames' stack slots (checked against the stack's
 * bounds by the caller, not by AddressSanitizer). */
#define FFG_UNCHECKED_READ __attribute__((no_sanitize("address")))

/* Where the interpreter stood when a guarded call was armed: the thread state, its
 * innermost Python frame and its recursion counters (pyhost.h). A fault belongs to the
 * guarded call only while all three are unchanged: a Python callback running inside the
 * call (and anything it calls, guarded or not) has moved them. Greenlets save and
 * restore them on every switch, so they also tell one greenlet's calls from another's. */
struct ffg_host {
    uint64_t ts, frame, depth;
};

/* One header per architecture: the guard frame and the signal-context fields. */
#if defined(FFG_NO_ARCH)
#include "arch/none.h"
#elif defined(__x86_64__)
#include "arch/x86_64.h"
#elif defined(__aarch64__)
#include "arch/aarch64.h"
#else
#error "ffiguard: no thunk for this architecture (setup.py builds with FFG_NO_ARCH)"
#endif

#define FFG_MAX_FRAMES 256 /* guarded calls nested on one thread (via callbacks) */
#define FFG_MAX_PENDING 32 /* faults recorded and not yet raised, per thread (see below) */
#define FFG_MAX_PCS 64     /* native backtrace depth kept per fault */
#define FFG_SENTINEL_TOKEN UINT64_MAX /* frames[0]: never a call's, never dead */

enum ffg_access { FFG_ACCESS_UNKNOWN, FFG_ACCESS_READ, FFG_ACCESS_WRITE, FFG_ACCESS_EXEC };

/* What the handler saw, copied out by the GuardedFunction whose token it carries.
 * Several can wait at once: a guarded call whose fault is pending (its ctypes result
 * conversion, restype callable or errcheck still running) may be followed by another
 * guarded call made from that Python code, which faults too. */
struct ffg_fault {
    uint64_t token; /* non-zero while a fault waits for its caller; written last */
    int signo;
    int code;
    int has_address;
    int access;
    int stack_overflow;
    uintptr_t address;
    uintptr_t pc;
    uintptr_t sp;
    uint64_t regs[FFG_NREGS];
    volatile int npcs; /* written as the unwinder goes (see ffg_unwind) */
    uintptr_t pcs[FFG_MAX_PCS];
};

/* interrupt (issue 16, interrupt.c): what may stop this thread's guarded calls that are
 * not faults. Written by the thread's GuardedFunction in normal context and read by the
 * handler on the same thread; sigint_pending is also written by another thread's SIGINT
 * handler (atomics). A stop belongs to a call by its token: an expiry or a Ctrl-C that
 * names a call that has returned names no live call, and does nothing. */
struct ffg_intr {
    uint64_t sigint_token;   /* the innermost running call that Ctrl-C stops, 0 none */
    uint64_t sigint_pending; /* Ctrl-C arrived for that token and has not stopped it yet */
    int sigint_code;         /* that SIGINT's si_code (kept for the report) */
    uint64_t timer_token;    /* the innermost running call with a timeout, 0 none */
    int64_t deadline;        /* its deadline, CLOCK_MONOTONIC nanoseconds */
    uint64_t deferred;       /* a stop wanted for this call could not be made yet */
    int deferred_signo;      /* SIGINT or the interrupt signal (a timeout) */
    int deferred_code;
    int has_timer;           /* timer exists (made at the thread's first timed call) */
    int timer_busy;          /* armed (by a call or a retry) and not known to be idle */
    timer_t timer;           /* signals this thread only (SIGEV_THREAD_ID) */
    pid_t tid;
};

struct ffg_thread {
    struct ffg_frame *top; /* T_TOP: the next free frame */
    struct ffg_frame *end; /* T_END */
    uintptr_t armed;       /* T_ARMED: the target a GuardedFunction is about to call, or 0 */
    uint64_t armed_token;  /* T_TOKEN: that call's token, for its guard frame */
    struct ffg_host armed_host; /* T_HOST: that call's interpreter position */
    uint64_t next_token;
    unsigned npending;     /* how many of faults[] wait for their GuardedFunction */
    sigset_t host_mask;    /* the signal mask guarded calls start with (restored after a fault) */
    uintptr_t stack_lo, stack_hi; /* this thread's stack, 0 when unknown */
    volatile sig_atomic_t unwinding;
    sigjmp_buf unwind_escape; /* a fault while unwinding jumps back here */
    stack_t previous_altstack;
    int owns_altstack;
    size_t mapping_size;
    struct ffg_intr intr; /* interrupt (issue 16) */
    struct ffg_fault faults[FFG_MAX_PENDING];
    /* frames[0] is a sentinel (token FFG_SENTINEL_TOKEN): the thunk's pop loop stops
     * there. A frame whose call has returned has token 0 ("dead"): calls can finish out
     * of order when greenlets switch C stacks, and a dead frame under a live one stays
     * until the live one returns. */
    struct ffg_frame frames[FFG_MAX_FRAMES + 1];
};

extern __thread struct ffg_thread *ffg_tls __attribute__((tls_model("initial-exec")));

/* state.c */
struct ffg_thread *ffg_thread_attach(void); /* normal context; NULL + errno on failure */
int ffg_state_init(void);
int ffg_note_mask(void); /* normal context: the calling thread's mask is now its host mask */

#define FFG_NSIGNALS 65 /* signal numbers 1..64 */

/* handler.c: the handler itself, and what it counts */
void ffg_on_signal(int signo, siginfo_t *si, void *context);
uint64_t ffg_recovered_count(int signo); /* signo 0: all */
int ffg_access_in_context(void);         /* -1 no fault yet, 0/1: see handler.c */
uint64_t ffg_unwind_escapes(void);       /* faults inside the unwinder, escaped: see capture_pcs */

/* unwind.c: the native backtrace, for the handler (async-signal-safe, lock-free).
 * Writes pcs[0] = the fault's pc, then the return addresses of the foreign frames,
 * innermost first, up to max, keeping *npcs current (a fault while unwinding leaves a
 * valid prefix). Stack reads stay inside [lo, hi); bad_call: pc may be a call's bad
 * target (an instruction fetch fault). */
int ffg_unwind(const ucontext_t *uc, uintptr_t lo, uintptr_t hi, int bad_call, uintptr_t *pcs, int max,
               volatile int *npcs); /* 1: the walk reached the guard thunk (every frame known) */
int ffg_unwind_available(void);          /* glibc has _dl_find_object: frames beyond pc */
void ffg_unwind_set_available(int on);   /* for the tests: as without _dl_find_object */

/* chain.c: the previous handlers, and installing ours (docs/design.md, "Living with
 * other handlers"). ffg_chain and ffg_chain_busy run in the signal handler. */
extern volatile sig_atomic_t ffg_trapped[FFG_NSIGNALS];
void ffg_chain(int signo, siginfo_t *si, ucontext_t *uc); /* a signal that is not ours */
/* The signal whose context is uc arrived while this thread runs a previous handler that
 * ffg_chain called (caused by it, or interrupting it): never a guarded call's. */
int ffg_chain_busy(const ucontext_t *uc);
int ffg_handlers_install(const int *signals, int n); /* -1 + errno on failure */
int ffg_handlers_untrap(int signo);               /* -1 + errno on failure */
int ffg_handlers_refresh(void);
int ffg_is_trapped(int signo);
uintptr_t ffg_handler_now(int signo); /* the installed handler's address (SIG_DFL 0, SIG_IGN 1) */
int ffg_handlers_after_faulthandler(const uintptr_t *before, int enabled); /* before[FFG_NSIGNALS] */

/* interrupt.c / handler.c (issue 16): stopping a hung call (docs/design.md, "Stopping a
 * hung call"). Signal handler: ffg_intr_on_signal (SIGINT and the interrupt signal; 1 if
 * it was one of them) and ffg_stop_call (stop the call with this token now, if the
 * thread is in that call's own foreign code: 1 if stopped). Normal context:
 * ffg_intr_thread_exit, from the thread-exit destructor. */
extern volatile sig_atomic_t ffg_intr_signo; /* 0 until set up */
int ffg_intr_on_signal(int signo, siginfo_t *si, ucontext_t *uc);
int ffg_stop_call(struct ffg_thread *t, uint64_t token, int signo, int code, ucontext_t *uc);
void ffg_intr_thread_exit(struct ffg_thread *t);
int ffg_intr_in_host(uintptr_t pc); /* signal handler: pc is the interpreter's, ctypes', cffi's, libffi's */
int ffg_handlers_on_top(int signo); /* chain.c: ours first for signo, chaining to what was there */

/* stubs.c */
uintptr_t ffg_stub_new(uintptr_t target); /* 0 + errno on failure */
uintptr_t ffg_stub_target(uintptr_t stub); /* 0 when not one of ours */

/* arch/<arch>.S (absent without an architecture: weak, so their addresses are NULL) */
#ifdef FFG_NO_ARCH
#define FFG_THUNK_DECL __attribute__((weak))
#else
#define FFG_THUNK_DECL
#endif
void ffg_thunk(void) FFG_THUNK_DECL;
void ffg_thunk_return(void) FFG_THUNK_DECL;
void ffg_thunk_recover(void) FFG_THUNK_DECL; /* where the handler resumes a faulted call */
void ffg_thunk_end(void) FFG_THUNK_DECL;

#endif
