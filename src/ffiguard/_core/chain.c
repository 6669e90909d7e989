/* The handlers installed before ours, and handing them the signals that are not ours.
 *
 * EVERYTHING IN THIS FILE THAT RUNS IN A SIGNAL HANDLER IS ASYNC-SIGNAL-SAFE: no malloc,
 * no stdio, no locks, no Python API. ffg_chain is called by the handler (handler.c) for
 * every signal it does not recover; installing, untrapping and refreshing run in
 * normal context.
 */
#define _GNU_SOURCE 1
#include "state.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static struct sigaction previous[FFG_NSIGNALS]; /* what was installed before us, kept current */
volatile sig_atomic_t ffg_trapped[FFG_NSIGNALS];

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
void ffg_chain(int signo, siginfo_t *si, ucontext_t *uc)
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

int ffg_chain_busy(void) { return chaining; }

/* ---- installing (normal context) --------------------------------------------------- */

static void ours(struct sigaction *sa)
{
    memset(sa, 0, sizeof *sa);
    sa->sa_sigaction = ffg_on_signal;
    sa->sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa->sa_mask);
}

int ffg_handlers_install(const int *signals, int n)
{
    struct sigaction sa, old;
    ours(&sa);
    for (int i = 0; i < n; i++) {
        int s = signals[i];
        if (s <= 0 || s >= FFG_NSIGNALS) {
            errno = EINVAL;
            return -1;
        }
        if (sigaction(s, &sa, &old) != 0)
            return -1;
        if (old.sa_sigaction != ffg_on_signal)
            previous[s] = old;
        ffg_trapped[s] = 1;
    }
    return 0;
}

/* Stop trapping a signal: put back what was installed before us if ours is on top;
 * if another handler has replaced ours since, it keeps chaining to us and we pass the
 * signal on. */
int ffg_handlers_untrap(int s)
{
    struct sigaction cur;
    if (s <= 0 || s >= FFG_NSIGNALS) {
        errno = EINVAL;
        return -1;
    }
    if (!ffg_trapped[s])
        return 0;
    ffg_trapped[s] = 0;
    if (sigaction(s, NULL, &cur) == 0 && cur.sa_sigaction == ffg_on_signal)
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
    for (int s = 1; s < FFG_NSIGNALS; s++) {
        if (!ffg_trapped[s] || sigaction(s, NULL, &cur) != 0 || cur.sa_sigaction == ffg_on_signal)
            continue;
        previous[s] = cur;
        sigaction(s, &sa, NULL);
        changed++;
    }
    return changed;
}

int ffg_is_trapped(int signo) { return signo > 0 && signo < FFG_NSIGNALS && ffg_trapped[signo]; }

size_t ffg_prev_snapshot(void *buf, size_t size)
{
    if (buf && size >= sizeof previous)
        memcpy(buf, previous, sizeof previous);
    return sizeof previous;
}

void ffg_prev_restore(const void *buf) { memcpy(previous, buf, sizeof previous); }

