/* Living with other signal handlers: the handlers installed before ours, handing them
 * the signals that are not ours exactly as the kernel would, and keeping ours where it
 * belongs in the line (docs/design.md, "Living with other handlers").
 *
 * EVERYTHING IN THIS FILE THAT RUNS IN A SIGNAL HANDLER IS ASYNC-SIGNAL-SAFE: no malloc,
 * no stdio, no locks, no Python API; only sigaction, pthread_sigmask, raw system calls,
 * atomics and this thread's own TLS. Those functions are marked "signal handler" below:
 * ffg_chain (called by the handler, handler.c, for every signal it does not recover) and
 * ffg_chain_busy (asked by the handler before it considers recovering). Installing,
 * untrapping, refreshing and following faulthandler run in normal context, serialised
 * by ffg_lock (never held while Python code runs, never taken by a signal handler).
 */
#define _GNU_SOURCE 1
#include "state.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef void (*ffg_handler_fn)(int);

/* What we hand a signal to when it is not ours (the disposition "behind" ours). Written
 * in normal context under ffg_lock: mask and flags first, then the handler with a release
 * store; the signal handler loads the handler with acquire, then the rest (ffg_load). The
 * one write from a signal handler is SA_RESETHAND's, an atomic exchange of the handler. */
static struct sigaction ffg_previous[FFG_NSIGNALS];
volatile sig_atomic_t ffg_trapped[FFG_NSIGNALS]; /* faults of this signal may be recovered */

/* faulthandler's handler (CPython's faulthandler_fatal_error), once ffiguard has seen
 * faulthandler.enable() replace its own: NULL until then. faulthandler reports and
 * never handles a fault: when it is called it puts back the disposition it replaced and
 * re-raises; once disabled it just returns. So it is the one handler ffiguard goes back
 * on top of, and the one handler that can be skipped: ffg_below_faulthandler[s] is what
 * we chained to before faulthandler was put behind us, used when it turns out idle
 * (disabled behind our back, as C code does at interpreter exit). */
static ffg_handler_fn ffg_faulthandler; /* atomic */
static struct sigaction ffg_below_faulthandler[FFG_NSIGNALS];

/* Normal context only, under ffg_lock: our handler is in the chain for this signal (we
 * put it on top and have not taken it out; it may since have had another on top). */
static int ffg_installed[FFG_NSIGNALS];
static pthread_mutex_t ffg_lock = PTHREAD_MUTEX_INITIALIZER;

/* ---- the previous handlers' slots --------------------------------------------------- */

/* Signal handler and normal context. */
static void ffg_load(const struct sigaction *slot, struct sigaction *out)
{
    memset(out, 0, sizeof *out);
    out->sa_handler = __atomic_load_n(&slot->sa_handler, __ATOMIC_ACQUIRE);
    out->sa_mask = slot->sa_mask;
    out->sa_flags = slot->sa_flags;
}

/* Normal context, ffg_lock held. */
static void ffg_store(struct sigaction *slot, const struct sigaction *in)
{
    slot->sa_mask = in->sa_mask;
    slot->sa_flags = in->sa_flags;
    __atomic_store_n(&slot->sa_handler, in->sa_handler, __ATOMIC_RELEASE);
}

/* ---- which previous handlers are running on this thread ----------------------------- */

/* While ffg_chain runs a previous handler, a signal on the same thread is one that
 * handler caused (its own fault, its re-raise, abort() in it) or one that interrupted it:
 * never a guarded call's, and, if the previous handler is faulthandler's, its re-raise.
 * A flag set around the call would outlive it when the handler escapes with siglongjmp
 * (probers, GC barriers, runtimes do), so each call is recorded with where it runs, and a
 * later signal counts as inside it only if the code it interrupted runs on the same stack
 * below that point: a nested signal does, and one after an escape does not (it
 * interrupted code outside any handler, off the alternate stack or above the record).
 * Records are kept in TLS, not on the stack, so a stale one is still readable. */
#define FFG_CHAIN_RECORDS 4 /* nested previous-handler calls recorded; deeper ones are
                               covered by the records that enclose them */
struct ffg_chain_call {
    uintptr_t sp;   /* ffg_chain's frame: the previous handler's frames lie below it */
    uintptr_t alt;  /* the alternate signal stack's base then, 0 if none */
    int signo;
    unsigned char on_alt;       /* sp is on that alternate stack */
    unsigned char faulthandler; /* the handler called is faulthandler's */
};
static __thread struct {
    int n;
    struct ffg_chain_call call[FFG_CHAIN_RECORDS];
} ffg_calls __attribute__((tls_model("initial-exec")));

/* Signal handler. The alternate stack as the kernel reports it in the signal frame. */
static uintptr_t ffg_alt_base(const ucontext_t *uc)
{
    return (uc->uc_stack.ss_flags & SS_DISABLE) ? 0 : (uintptr_t)uc->uc_stack.ss_sp;
}

/* Signal handler: the signal whose context is uc interrupted code running inside call c. */
static int ffg_inside(const struct ffg_chain_call *c, const ucontext_t *uc)
{
    uintptr_t sp = ffg_uc_sp(uc), alt = ffg_alt_base(uc);
    if (alt != c->alt)
        return 0; /* the thread's alternate stack changed since: not the same handler run */
    if (c->on_alt)
        return sp >= c->alt && sp < c->sp;
    int on_alt_now = alt && sp >= alt && sp - alt < (uintptr_t)uc->uc_stack.ss_size;
    return !on_alt_now && sp < c->sp;
}

/* Signal handler: drop records of calls that were escaped (the innermost ones that do
 * not enclose this signal); returns how many remain, all enclosing it. */
static int ffg_prune(const ucontext_t *uc)
{
    int n = ffg_calls.n;
    while (n > 0 && !ffg_inside(&ffg_calls.call[n - 1], uc))
        n--;
    ffg_calls.n = n;
    return n;
}

int ffg_chain_busy(const ucontext_t *uc) /* signal handler */
{
    return ffg_calls.n > 0 && ffg_prune(uc) > 0;
}

/* Signal handler: inside our call of faulthandler's handler for this signal. */
static int ffg_inside_faulthandler(int signo)
{
    for (int i = 0; i < ffg_calls.n; i++)
        if (ffg_calls.call[i].faulthandler && ffg_calls.call[i].signo == signo)
            return 1;
    return 0;
}

/* ---- handing a signal on ------------------------------------------------------------ */

/* Signal handler: the default action (every signal we trap dumps core). A fault happens
 * again when the handler returns; a sent signal is sent again with its own siginfo. */
static void ffg_default_action(int signo, siginfo_t *si)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(signo, &dfl, NULL);
    if (si->si_code > 0)
        return;
    if (syscall(SYS_rt_tgsigqueueinfo, getpid(), (pid_t)syscall(SYS_gettid), signo, si) != 0)
        raise(signo);
}

/* Signal handler: call a handler as the kernel would: with this signal's siginfo and
 * context, the current mask plus its sa_mask plus the signal unless SA_NODEFER, and a
 * record of the call for ffg_chain_busy. The mask is left as the handler leaves it: the
 * kernel restores the interrupted one at sigreturn, as it would after the handler's own. */
static void ffg_call(const struct sigaction *sa, int signo, siginfo_t *si, ucontext_t *uc, int faulthandler)
{
    sigset_t mask = sa->sa_mask;
    if (!(sa->sa_flags & SA_NODEFER))
        sigaddset(&mask, signo);
    pthread_sigmask(SIG_BLOCK, &mask, NULL);

    int slot = ffg_calls.n;
    if (slot < FFG_CHAIN_RECORDS) {
        struct ffg_chain_call *c = &ffg_calls.call[slot];
        c->sp = (uintptr_t)__builtin_frame_address(0);
        c->alt = ffg_alt_base(uc);
        c->on_alt = c->alt && c->sp >= c->alt && c->sp - c->alt < (uintptr_t)uc->uc_stack.ss_size;
        c->signo = signo;
        c->faulthandler = (unsigned char)faulthandler;
        __atomic_signal_fence(__ATOMIC_SEQ_CST); /* recorded before the handler runs */
        ffg_calls.n = slot + 1;
    }
    if (sa->sa_flags & SA_SIGINFO)
        sa->sa_sigaction(signo, si, uc);
    else
        sa->sa_handler(signo);
    if (slot < FFG_CHAIN_RECORDS)
        ffg_calls.n = slot;
}

/* Signal handler: hand the signal to the disposition kept in slot. */
static void ffg_pass(struct sigaction *slot, int signo, siginfo_t *si, ucontext_t *uc)
{
    struct sigaction sa;
    ffg_load(slot, &sa);
    if (sa.sa_handler == SIG_DFL) {
        ffg_default_action(signo, si);
        return;
    }
    if (sa.sa_handler == SIG_IGN) {
        if (si->si_code > 0) /* the kernel does not let a thread ignore its own fault */
            ffg_default_action(signo, si);
        return;
    }
    if (sa.sa_flags & SA_RESETHAND) {
        /* One-shot: the disposition behind us becomes SIG_DFL before the handler runs, so
         * the next such signal takes the default action. Of two threads racing here, one
         * runs the handler and the other gets SIG_DFL, as the kernel's lock would decide. */
        ffg_handler_fn was = __atomic_exchange_n(&slot->sa_handler, SIG_DFL, __ATOMIC_ACQ_REL);
        if (was != sa.sa_handler) {
            ffg_default_action(signo, si);
            return;
        }
    }
    ffg_call(&sa, signo, si, uc, 0);
}

/* Not ours: behave as the kernel would for the previous handler (see ffg_pass). Signal
 * handler. faulthandler's handler is the one exception: its re-raise into us ends in the
 * default action (it has reported once), and when it returns without having done
 * anything it is idle, so the handler it was put in front of gets the signal instead. */
void ffg_chain(int signo, siginfo_t *si, ucontext_t *uc)
{
    if (signo <= 0 || signo >= FFG_NSIGNALS)
        return;
    if (ffg_calls.n > 0)
        ffg_prune(uc);
    ffg_handler_fn fh = __atomic_load_n(&ffg_faulthandler, __ATOMIC_ACQUIRE);
    struct sigaction prev;
    ffg_load(&ffg_previous[signo], &prev);
    if (!fh || prev.sa_handler != fh) {
        ffg_pass(&ffg_previous[signo], signo, si, uc);
        return;
    }
    if (ffg_inside_faulthandler(signo)) {
        ffg_default_action(signo, si); /* its re-raise, after its report */
        return;
    }
    /* An enabled faulthandler puts back what it replaced and re-raises: the disposition
     * changes, or (when what it replaced is ours) the re-raise comes back here and the
     * process dies. Returning with the disposition unchanged means it did nothing. */
    struct sigaction before, after;
    sigset_t entry;
    sigaction(signo, NULL, &before);
    pthread_sigmask(SIG_BLOCK, NULL, &entry);
    ffg_call(&prev, signo, si, uc, 1);
    sigaction(signo, NULL, &after);
    if (after.sa_handler != before.sa_handler)
        return;
    pthread_sigmask(SIG_SETMASK, &entry, NULL);
    ffg_pass(&ffg_below_faulthandler[signo], signo, si, uc);
}

/* ---- installing (normal context) ---------------------------------------------------- */

static void ffg_ours(struct sigaction *sa)
{
    memset(sa, 0, sizeof *sa);
    sa->sa_sigaction = ffg_on_signal;
    sa->sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa->sa_mask);
}

static int ffg_is_ours(const struct sigaction *sa)
{
    return (sa->sa_flags & SA_SIGINFO) && sa->sa_sigaction == ffg_on_signal;
}

/* ffg_lock held: put ours on top of what is installed now, chaining to it. */
static int ffg_put_on_top(int s, const struct sigaction *current)
{
    struct sigaction sa;
    ffg_ours(&sa);
    if (!ffg_is_ours(current))
        ffg_store(&ffg_previous[s], current);
    if (sigaction(s, &sa, NULL) != 0)
        return -1;
    ffg_installed[s] = 1;
    return 0;
}

/* ffg_lock held: our handler was taken out outright (SIG_DFL or SIG_IGN is installed:
 * nobody's handler would lose a signal to ours): put it back. Returns 1 if it did. */
static int ffg_reinstall_if_removed(int s)
{
    struct sigaction cur;
    if (sigaction(s, NULL, &cur) != 0 || ffg_is_ours(&cur) ||
        (cur.sa_handler != SIG_DFL && cur.sa_handler != SIG_IGN))
        return 0;
    return ffg_put_on_top(s, &cur) == 0;
}

static int ffg_valid(int s) { return s > 0 && s < FFG_NSIGNALS; }

/* Trap these signals. Where our handler is not in the chain yet, it goes on top of what
 * is installed and chains to it. Where it is, it stays where it is: a handler installed
 * after ours (a runtime handling its own faults) stays first in line. */
int ffg_handlers_install(const int *signals, int n)
{
    for (int i = 0; i < n; i++)
        if (!ffg_valid(signals[i])) {
            errno = EINVAL;
            return -1;
        }
    int rc = 0;
    pthread_mutex_lock(&ffg_lock);
    for (int i = 0; i < n && rc == 0; i++) {
        int s = signals[i];
        struct sigaction cur;
        if (!ffg_installed[s])
            rc = sigaction(s, NULL, &cur) != 0 ? -1 : ffg_put_on_top(s, &cur);
        else
            ffg_reinstall_if_removed(s);
        if (rc == 0)
            ffg_trapped[s] = 1;
    }
    pthread_mutex_unlock(&ffg_lock);
    return rc;
}

/* Stop trapping a signal: put back what was installed before us if ours is on top; if
 * another handler has been installed on top of ours since, it keeps chaining to us and
 * we pass the signal on. */
int ffg_handlers_untrap(int s)
{
    if (!ffg_valid(s)) {
        errno = EINVAL;
        return -1;
    }
    int rc = 0;
    pthread_mutex_lock(&ffg_lock);
    ffg_trapped[s] = 0;
    struct sigaction cur, prev;
    if (ffg_installed[s] && sigaction(s, NULL, &cur) == 0 && ffg_is_ours(&cur)) {
        ffg_load(&ffg_previous[s], &prev);
        rc = sigaction(s, &prev, NULL);
        if (rc == 0)
            ffg_installed[s] = 0;
    }
    pthread_mutex_unlock(&ffg_lock);
    return rc;
}

/* Put our handler back where it was taken out outright (see ffg_reinstall_if_removed),
 * for the trapped signals. Never on top of anyone's handler. Returns how many moved. */
int ffg_handlers_refresh(void)
{
    int moved = 0;
    pthread_mutex_lock(&ffg_lock);
    for (int s = 1; s < FFG_NSIGNALS; s++)
        if (ffg_installed[s] && ffg_trapped[s])
            moved += ffg_reinstall_if_removed(s);
    pthread_mutex_unlock(&ffg_lock);
    return moved;
}

/* The handler installed for s now, as an address (0 for SIG_DFL, 1 for SIG_IGN). */
uintptr_t ffg_handler_now(int s)
{
    struct sigaction cur;
    if (!ffg_valid(s) || sigaction(s, NULL, &cur) != 0)
        return 0;
    return (cur.sa_flags & SA_SIGINFO) ? (uintptr_t)cur.sa_sigaction : (uintptr_t)cur.sa_handler;
}

/* After faulthandler.enable() or disable() (through ffiguard's wrappers): before[s] is
 * the handler installed for s just before (ffg_handler_now), enabled whether
 * faulthandler is enabled now. faulthandler replaces whatever is on top when enabled,
 * and puts back what it replaced when disabled. Where it replaced ours, ours goes back
 * on top: chaining to faulthandler's handler (enable), or to what it put back, which
 * was below ours anyway (disable). Where it replaced someone else's, that is between
 * them. Once it is disabled, its handler behind ours is skipped. */
int ffg_handlers_after_faulthandler(const uintptr_t *before, int enabled)
{
    int moved = 0;
    pthread_mutex_lock(&ffg_lock);
    for (int s = 1; s < FFG_NSIGNALS; s++) {
        struct sigaction cur, prev;
        if (!ffg_installed[s] || sigaction(s, NULL, &cur) != 0)
            continue;
        ffg_handler_fn fh = __atomic_load_n(&ffg_faulthandler, __ATOMIC_ACQUIRE);
        ffg_load(&ffg_previous[s], &prev);
        if (!enabled && fh && prev.sa_handler == fh) {
            ffg_load(&ffg_below_faulthandler[s], &prev);
            ffg_store(&ffg_previous[s], &prev);
        }
        if (before[s] != (uintptr_t)ffg_on_signal || ffg_is_ours(&cur))
            continue;
        if (enabled && !(cur.sa_flags & SA_SIGINFO) && cur.sa_handler != SIG_DFL && cur.sa_handler != SIG_IGN) {
            __atomic_store_n(&ffg_faulthandler, cur.sa_handler, __ATOMIC_RELEASE);
            ffg_load(&ffg_previous[s], &prev);
            ffg_store(&ffg_below_faulthandler[s], &prev);
        }
        if (ffg_put_on_top(s, &cur) == 0)
            moved++;
    }
    pthread_mutex_unlock(&ffg_lock);
    return moved;
}

int ffg_is_trapped(int signo) { return ffg_valid(signo) && ffg_trapped[signo]; }

/* interrupt (issue 16): make ours the first handler for signo (SIGINT), chaining to
 * whatever is installed now (Python's own SIGINT handler), without trapping it as a
 * fault. Python's signal.signal() installs its handler over ours: this is asked again
 * before every call that Ctrl-C may stop (one sigaction query when ours is in place). */
int ffg_handlers_on_top(int s)
{
    if (!ffg_valid(s)) {
        errno = EINVAL;
        return -1;
    }
    struct sigaction cur;
    if (sigaction(s, NULL, &cur) != 0)
        return -1;
    if (ffg_is_ours(&cur))
        return 0;
    pthread_mutex_lock(&ffg_lock);
    int rc = sigaction(s, NULL, &cur) != 0 ? -1 : ffg_is_ours(&cur) ? 0 : ffg_put_on_top(s, &cur);
    pthread_mutex_unlock(&ffg_lock);
    return rc;
}
