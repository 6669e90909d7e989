/* Stopping a hung call (issue 16; docs/design.md, "Stopping a hung call").
 *
 * A guarded call made interruptible (Ctrl-C, on the main thread) or given a timeout can
 * be stopped the way a fault is recovered: the handler edits the saved context so that
 * sigreturn resumes at the thunk's return path (handler.c, ffg_stop_call), and the
 * GuardedFunction raises ForeignInterrupt (a KeyboardInterrupt) or ForeignTimeout.
 *
 * Delivery:
 * - timeouts: each thread that makes a timed (or Ctrl-C-stoppable) call gets one POSIX
 *   timer, made at its first such call, that signals that thread alone (SIGEV_THREAD_ID)
 *   with ffiguard's interrupt signal: the highest real-time signal nobody has a handler
 *   for when ffiguard first needs one (normally SIGRTMAX, far from glibc's reserved
 *   32/33 and from the SIGRTMIN+n that programs take first). A timed call arms it
 *   (absolute CLOCK_MONOTONIC deadline) and disarms it before returning.
 * - Ctrl-C: our handler sits on top of Python's own for SIGINT while an interruptible
 *   call may run on the main thread; it first hands the signal to Python's handler
 *   exactly as the kernel would (chain.c: its flag and wakeup fd are set as always), and
 *   then, if the main thread is in a Ctrl-C-stoppable call, marks it and looks at it on
 *   that thread: directly when the SIGINT landed there, else by sending the main thread
 *   the interrupt signal (tgkill).
 *
 * Every expiry or Ctrl-C names the call it is for by its token (the call's own, also in
 * its guard frame): a signal that arrives after that call returned names no running
 * call and does nothing. The call is stopped only when the thread runs that call's own
 * foreign code (handler.c's interpreter-position test); otherwise (Python code: argument
 * conversion, a callback, anything a callback calls; the thunk itself) the stop is
 * deferred: remembered, and the timer re-armed to look again in FFG_INTR_RETRY_NS. A
 * call that returns with a stop still deferred raises all the same (with no foreign pc).
 *
 * ffg_intr_on_signal and what it calls run in the signal handler and are
 * ASYNC-SIGNAL-SAFE: clock_gettime, timer_settime, tgkill (raw system calls), atomics,
 * the thread's own mmap'd state, no locks, no malloc, no Python API. The rest is normal
 * context (Python API; the setup under a mutex; nothing relies on the GIL).
 */
#include "core.h"

#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <math.h>
#include <pthread.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define FFG_INTR_RETRY_NS (1000 * 1000) /* a deferred stop is tried again after 1 ms */
#define FFG_NS_PER_S_INT 1000000000LL
#define FFG_TIMEOUT_MAX_S 1e9 /* ~31 years: keeps the deadline inside int64 nanoseconds */
#define FFG_STRINGIFY_(x) #x
#define FFG_STRINGIFY(x) FFG_STRINGIFY_(x)

volatile sig_atomic_t ffg_intr_signo; /* atomic: 0 until ffg_intr_setup chose it */

/* The main thread's state, once it made a Ctrl-C-stoppable call (atomic: read by any
 * thread's SIGINT handler). */
static struct ffg_thread *ffg_intr_main;

/* Set at import by ffiguard.interrupt (normal context). */
static struct {
    PyObject *getsignal;            /* signal.getsignal */
    PyObject *default_int_handler;  /* signal.default_int_handler */
    PyObject *sigint;               /* SIGINT as an int */
    PyObject *factory;              /* interrupt.from_record(record, function, args, kwnames, policy, timeout) */
    pthread_t main_thread;          /* the interpreter's main thread (runs Python's handlers) */
    int main_known;
} ffg_intr_py;

static pthread_mutex_t ffg_intr_lock = PTHREAD_MUTEX_INITIALIZER;

/* The code of the host's own machinery: the interpreter (libpython or the executable),
 * ctypes, cffi's backend and libffi. A Python callback inside a guarded call enters and
 * leaves the interpreter through them with no thread state attached (PyGILState_Ensure,
 * take_gil: the GIL's mutex and condition variable), where the interpreter-position test
 * says "the call's foreign code"; a fault there is fatal anyway, but a stop there would
 * leave the GIL's lock held. So a stop is not made while any frame between the stop
 * and the guard frame lies in these ranges (ffg_stop_call). Append-only (a range of an
 * unloaded library stays: the safe side); written under ffg_intr_lock, the count
 * published last. */
#define FFG_INTR_MAX_HOSTS 32
static struct {
    uintptr_t lo, hi;
} ffg_intr_hosts[FFG_INTR_MAX_HOSTS];
static int ffg_intr_nhosts; /* atomic */

static const char *const ffg_host_names[] = {"libpython", "_ctypes", "_cffi_backend", "libffi", NULL};

static int ffg_is_host_object(const char *path)
{
    if (!path || !*path)
        return 1; /* the executable: the interpreter when it is statically linked */
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    for (int i = 0; ffg_host_names[i]; i++)
        if (strncmp(base, ffg_host_names[i], strlen(ffg_host_names[i])) == 0)
            return 1;
    return 0;
}

/* dl_iterate_phdr callback, ffg_intr_lock held (normal context). */
static int ffg_add_host_ranges(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    (void)data;
    if (!ffg_is_host_object(info->dlpi_name))
        return 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_X))
            continue;
        uintptr_t lo = info->dlpi_addr + ph->p_vaddr, hi = lo + ph->p_memsz;
        int n = __atomic_load_n(&ffg_intr_nhosts, __ATOMIC_RELAXED), known = 0;
        for (int j = 0; j < n && !known; j++)
            known = ffg_intr_hosts[j].lo == lo && ffg_intr_hosts[j].hi == hi;
        if (known || n == FFG_INTR_MAX_HOSTS)
            continue;
        ffg_intr_hosts[n].lo = lo;
        ffg_intr_hosts[n].hi = hi;
        __atomic_store_n(&ffg_intr_nhosts, n + 1, __ATOMIC_RELEASE);
    }
    return 0;
}

static void ffg_intr_refresh_hosts(void)
{
    pthread_mutex_lock(&ffg_intr_lock);
    dl_iterate_phdr(ffg_add_host_ranges, NULL);
    pthread_mutex_unlock(&ffg_intr_lock);
}

/* ---- signal handler ------------------------------------------------------------------ */

/* Signal handler: pc is in the host's own machinery (see ffg_intr_hosts). */
int ffg_intr_in_host(uintptr_t pc)
{
    int n = __atomic_load_n(&ffg_intr_nhosts, __ATOMIC_ACQUIRE);
    for (int i = 0; i < n; i++)
        if (pc >= ffg_intr_hosts[i].lo && pc < ffg_intr_hosts[i].hi)
            return 1;
    return 0;
}

static int64_t ffg_now_ns(void) /* signal handler and normal context */
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * FFG_NS_PER_S_INT + ts.tv_nsec;
}

/* Arm the thread's timer for an absolute deadline. Signal handler and normal context
 * (the same thread's: no race on the timer). */
static void ffg_intr_arm(struct ffg_thread *t, int64_t deadline)
{
    if (!t->intr.has_timer)
        return;
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = (time_t)(deadline / FFG_NS_PER_S_INT);
    its.it_value.tv_nsec = (long)(deadline % FFG_NS_PER_S_INT);
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
        its.it_value.tv_nsec = 1; /* zero would disarm */
    t->intr.timer_busy = 1;
    timer_settime(t->intr.timer, TIMER_ABSTIME, &its, NULL);
}

static void ffg_intr_disarm(struct ffg_thread *t)
{
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    if (t->intr.has_timer)
        timer_settime(t->intr.timer, 0, &its, NULL);
    t->intr.timer_busy = 0;
}

/* Signal handler: remember a stop that cannot be made now (the call ends up raising it
 * even if it returns before the next try). */
static void ffg_intr_defer(struct ffg_thread *t, uint64_t token, int signo, int code)
{
    t->intr.deferred_signo = signo;
    t->intr.deferred_code = code;
    __atomic_store_n(&t->intr.deferred, token, __ATOMIC_RELEASE);
}

/* Signal handler, on the thread whose calls it may stop: stop the call a Ctrl-C or an
 * expired deadline is for, if the thread is in its foreign code; else defer and look
 * again soon. An expiry for no running call (it returned) changes nothing. */
static void ffg_intr_evaluate(struct ffg_thread *t, ucontext_t *uc)
{
    uint64_t sig_tok = __atomic_load_n(&t->intr.sigint_token, __ATOMIC_ACQUIRE);
    uint64_t tim_tok = __atomic_load_n(&t->intr.timer_token, __ATOMIC_ACQUIRE);
    int64_t now = ffg_now_ns();
    int want_sigint = sig_tok && __atomic_load_n(&t->intr.sigint_pending, __ATOMIC_ACQUIRE) == sig_tok;
    int want_timeout = tim_tok && now >= t->intr.deadline;
    int sigint_code = t->intr.sigint_code;
    if (want_sigint && ffg_stop_call(t, sig_tok, SIGINT, sigint_code, uc)) {
        __atomic_store_n(&t->intr.sigint_pending, 0, __ATOMIC_RELAXED);
        __atomic_compare_exchange_n(&t->intr.deferred, &sig_tok, 0, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
        return;
    }
    if (want_timeout && ffg_stop_call(t, tim_tok, ffg_intr_signo, SI_TIMER, uc)) {
        __atomic_compare_exchange_n(&t->intr.deferred, &tim_tok, 0, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
        return;
    }
    if (want_sigint)
        ffg_intr_defer(t, sig_tok, SIGINT, sigint_code);
    else if (want_timeout)
        ffg_intr_defer(t, tim_tok, ffg_intr_signo, SI_TIMER);
    if (want_sigint || want_timeout)
        ffg_intr_arm(t, now + FFG_INTR_RETRY_NS);
    else if (tim_tok)
        ffg_intr_arm(t, t->intr.deadline); /* early (a retry meant for a stop made since) */
}

/* Signal handler: SIGINT or the interrupt signal reached ffg_on_signal. 1: handled. */
int ffg_intr_on_signal(int signo, siginfo_t *si, ucontext_t *uc)
{
    struct ffg_thread *t = ffg_tls;
    if (signo != SIGINT) {
        if (t) /* no state: no call of this thread to stop */
            ffg_intr_evaluate(t, uc);
        return 1;
    }
    ffg_chain(SIGINT, si, uc); /* Python's handler first, exactly as the kernel would */
    struct ffg_thread *main = __atomic_load_n(&ffg_intr_main, __ATOMIC_ACQUIRE);
    if (!main)
        return 1;
    uint64_t tok = __atomic_load_n(&main->intr.sigint_token, __ATOMIC_ACQUIRE);
    if (!tok)
        return 1;
    main->intr.sigint_code = si->si_code;
    __atomic_store_n(&main->intr.sigint_pending, tok, __ATOMIC_RELEASE);
    if (main == t)
        ffg_intr_evaluate(t, uc);
    else
        syscall(SYS_tgkill, getpid(), main->intr.tid, (int)ffg_intr_signo);
    return 1;
}

/* ---- normal context ------------------------------------------------------------------ */

static void ffg_intr_after_fork(void)
{
    /* Timers are not inherited, the forking thread is the child's main thread. */
    pthread_mutex_init(&ffg_intr_lock, NULL);
    struct ffg_thread *t = ffg_tls;
    if (t) {
        t->intr.has_timer = 0;
        t->intr.timer_busy = 0;
        t->intr.tid = (pid_t)syscall(SYS_gettid);
    }
    ffg_intr_py.main_thread = pthread_self();
    __atomic_store_n(&ffg_intr_main, NULL, __ATOMIC_RELEASE);
}

/* Whether a timer can signal this thread with s (qemu-user accepts sigaction for the
 * guest's two highest real-time signals but refuses timers on them: EINVAL). */
static int ffg_timer_signal_works(int s)
{
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = s;
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid); /* sigev_notify_thread_id */
    timer_t probe;
    if (timer_create(CLOCK_MONOTONIC, &sev, &probe) != 0)
        return 0;
    timer_delete(probe);
    return 1;
}

/* Choose the interrupt signal and install our handler for it (once): the highest
 * real-time signal with no handler that a timer can send. -1 + exception. */
static int ffg_intr_setup(void)
{
    int rc = 0;
    pthread_mutex_lock(&ffg_intr_lock);
    if (!ffg_intr_signo) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = ffg_on_signal;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
        sigemptyset(&sa.sa_mask);
        for (int s = SIGRTMAX; s > SIGRTMIN && !ffg_intr_signo; s--) {
            struct sigaction cur;
            if (sigaction(s, NULL, &cur) != 0 || (cur.sa_flags & SA_SIGINFO) || cur.sa_handler != SIG_DFL ||
                !ffg_timer_signal_works(s))
                continue;
            ffg_intr_signo = s; /* first: our handler passes on what it does not know */
            if (sigaction(s, &sa, NULL) != 0)
                ffg_intr_signo = 0;
        }
        if (ffg_intr_signo)
            pthread_atfork(NULL, NULL, ffg_intr_after_fork);
        else {
            errno = EBUSY;
            rc = -1;
        }
    }
    pthread_mutex_unlock(&ffg_intr_lock);
    if (rc == 0)
        ffg_intr_refresh_hosts();
    if (rc < 0)
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, "ffiguard: no free real-time signal for interruptions");
    return rc;
}

static int ffg_intr_make_timer(struct ffg_thread *t)
{
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = ffg_intr_signo;
    t->intr.tid = (pid_t)syscall(SYS_gettid);
    sev._sigev_un._tid = t->intr.tid; /* sigev_notify_thread_id */
    if (timer_create(CLOCK_MONOTONIC, &sev, &t->intr.timer) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    t->intr.has_timer = 1;
    return 0;
}

void ffg_intr_thread_exit(struct ffg_thread *t)
{
    if (t->intr.has_timer)
        timer_delete(t->intr.timer);
    t->intr.has_timer = 0;
    struct ffg_thread *self = t;
    __atomic_compare_exchange_n(&ffg_intr_main, &self, NULL, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

/* Whether Ctrl-C may stop a call of this thread now: it is the main thread (where
 * Python runs its signal handlers) and Python's handler for SIGINT is
 * signal.default_int_handler (the program did not ignore it nor install its own: then
 * it keeps deciding, after the call). Puts our handler on top of Python's. 1, 0, -1. */
static int ffg_intr_sigint_ok(void)
{
    if (!ffg_intr_py.main_known || !pthread_equal(pthread_self(), ffg_intr_py.main_thread))
        return 0;
    PyObject *handler = PyObject_CallOneArg(ffg_intr_py.getsignal, ffg_intr_py.sigint);
    if (!handler)
        return -1;
    int is_default = handler == ffg_intr_py.default_int_handler;
    Py_DECREF(handler);
    if (!is_default)
        return 0;
    if (ffg_handlers_on_top(SIGINT) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 1;
}

int ffg_intr_begin(struct ffg_thread *t, uint64_t token, int interruptible, int64_t timeout_ns,
                   struct ffg_intr_saved *saved)
{
    if (!__atomic_load_n(&ffg_intr_signo, __ATOMIC_RELAXED) && ffg_intr_setup() < 0)
        return -1;
    saved->sigint_token = t->intr.sigint_token;
    saved->timer_token = t->intr.timer_token;
    saved->deadline = t->intr.deadline;
    int sigint = 0;
    if (interruptible && (sigint = ffg_intr_sigint_ok()) < 0)
        return -1;
    if ((sigint || timeout_ns) && !t->intr.has_timer && ffg_intr_make_timer(t) < 0)
        return -1;
    if (sigint) {
        __atomic_store_n(&t->intr.sigint_token, token, __ATOMIC_RELEASE);
        __atomic_store_n(&ffg_intr_main, t, __ATOMIC_RELEASE);
    }
    if (timeout_ns) {
        /* The token goes to 0 first, then the deadline, then the token: the handler on
         * this thread never sees a token with another call's deadline. */
        __atomic_store_n(&t->intr.timer_token, 0, __ATOMIC_RELEASE);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        int64_t deadline = ffg_now_ns() + timeout_ns;
        t->intr.deadline = deadline;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        __atomic_store_n(&t->intr.timer_token, token, __ATOMIC_RELEASE);
        ffg_intr_arm(t, deadline);
    }
    return 0;
}

/* A stop deferred until the call returned: its record, with no foreign pc (the thread
 * was running Python code or the thunk each time it was tried). */
static void ffg_intr_deferred_record(struct ffg_thread *t, uint64_t token)
{
    for (int i = 0; i < FFG_MAX_PENDING; i++) {
        struct ffg_fault *r = &t->faults[i];
        if (__atomic_load_n(&r->token, __ATOMIC_ACQUIRE) != 0)
            continue;
        memset(r, 0, sizeof *r);
        r->signo = t->intr.deferred_signo;
        r->code = t->intr.deferred_code;
        r->access = FFG_ACCESS_UNKNOWN;
        __atomic_store_n(&r->token, token, __ATOMIC_RELEASE);
        __atomic_fetch_add(&t->npending, 1, __ATOMIC_RELEASE);
        return;
    }
}

void ffg_intr_end(struct ffg_thread *t, uint64_t token, const struct ffg_intr_saved *saved)
{
    __atomic_store_n(&t->intr.sigint_token, saved->sigint_token, __ATOMIC_RELEASE);
    __atomic_store_n(&t->intr.timer_token, 0, __ATOMIC_RELEASE); /* see ffg_intr_begin */
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    t->intr.deadline = saved->deadline;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    __atomic_store_n(&t->intr.timer_token, saved->timer_token, __ATOMIC_RELEASE);
    if (saved->timer_token)
        ffg_intr_arm(t, saved->deadline); /* the enclosing call's deadline again */
    else if (t->intr.timer_busy)
        ffg_intr_disarm(t); /* before anything else runs: no expiry outlives the call */
    /* From here on no signal names this call; one deferred before is raised now. */
    uint64_t deferred = token;
    if (__atomic_compare_exchange_n(&t->intr.deferred, &deferred, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        ffg_intr_deferred_record(t, token);
}

int ffg_intr_is_stop(int signo)
{
    return signo == SIGINT || (signo != 0 && signo == ffg_intr_signo);
}

int ffg_intr_timeout_ns(PyObject *timeout, int64_t *ns)
{
    *ns = 0;
    if (!timeout || timeout == Py_None)
        return 0;
    double s = PyFloat_AsDouble(timeout);
    if (s == -1.0 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "timeout must be a number of seconds or None, not %.200s",
                     Py_TYPE(timeout)->tp_name);
        return -1;
    }
    if (!(s > 0) || !isfinite(s) || s > FFG_TIMEOUT_MAX_S) {
        PyErr_Format(PyExc_ValueError, "timeout must be a positive number of seconds (at most "
                     FFG_STRINGIFY(FFG_TIMEOUT_MAX_S) ") or None, not %R", timeout);
        return -1;
    }
    *ns = (int64_t)(s * FFG_NS_PER_S);
    if (*ns < 1)
        *ns = 1;
    return 0;
}

/* The exception for a stop's record (ffiguard.interrupt.from_record). For a Ctrl-C, the
 * SIGINT Python's handler recorded is consumed first: the KeyboardInterrupt it would
 * raise at the next check is this one. New reference, or NULL + exception. */
PyObject *ffg_intr_exception(PyObject *record, PyObject *name, PyObject *call_args, PyObject *kwnames,
                             PyObject *policy, int64_t timeout_ns)
{
    if (!ffg_intr_py.factory) {
        PyErr_SetString(PyExc_SystemError, "ffiguard: interrupt factory not set");
        return NULL;
    }
    long signo = PyLong_AsLong(PyTuple_GET_ITEM(record, 0));
    if (signo == SIGINT && PyErr_CheckSignals() < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
            return NULL; /* another handler raised: that exception stands */
        PyErr_Clear();
    }
    PyObject *timeout = timeout_ns ? PyFloat_FromDouble((double)timeout_ns / FFG_NS_PER_S) : Py_NewRef(Py_None);
    if (!timeout)
        return NULL;
    PyObject *exc = PyObject_CallFunctionObjArgs(ffg_intr_py.factory, record, name, call_args,
                                                 kwnames ? kwnames : Py_None, policy, timeout, NULL);
    Py_DECREF(timeout);
    return exc;
}

/* ---- Python-facing -------------------------------------------------------------------- */

static PyObject *ffg_m_intr_setup(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *getsignal, *default_int_handler, *factory;
    unsigned long main_ident;
    if (!PyArg_ParseTuple(args, "OOkO:_intr_setup", &getsignal, &default_int_handler, &main_ident, &factory))
        return NULL;
    if (!PyCallable_Check(getsignal) || !PyCallable_Check(factory)) {
        PyErr_SetString(PyExc_TypeError, "_intr_setup(getsignal, default_int_handler, main ident, factory)");
        return NULL;
    }
    PyObject *sigint = PyLong_FromLong(SIGINT);
    if (!sigint)
        return NULL;
    pthread_mutex_lock(&ffg_intr_lock);
    PyObject *old[] = {ffg_intr_py.getsignal, ffg_intr_py.default_int_handler, ffg_intr_py.sigint,
                       ffg_intr_py.factory};
    ffg_intr_py.getsignal = Py_NewRef(getsignal);
    ffg_intr_py.default_int_handler = Py_NewRef(default_int_handler);
    ffg_intr_py.sigint = sigint;
    ffg_intr_py.factory = Py_NewRef(factory);
    ffg_intr_py.main_thread = (pthread_t)main_ident;
    ffg_intr_py.main_known = 1;
    pthread_mutex_unlock(&ffg_intr_lock);
    for (size_t i = 0; i < sizeof old / sizeof old[0]; i++)
        Py_XDECREF(old[i]);
    Py_RETURN_NONE;
}

static PyObject *ffg_m_interrupt_signal(PyObject *mod, PyObject *noargs)
{
    (void)mod;
    (void)noargs;
    if (!ffg_intr_signo && ffg_intr_setup() < 0)
        return NULL;
    return PyLong_FromLong(ffg_intr_signo);
}

static PyObject *ffg_m_stopped(PyObject *mod, PyObject *noargs)
{
    (void)mod;
    (void)noargs;
    uint64_t n = ffg_recovered_count(SIGINT) + (ffg_intr_signo ? ffg_recovered_count(ffg_intr_signo) : 0);
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *ffg_m_intr_refresh_hosts(PyObject *mod, PyObject *noargs)
{
    (void)mod;
    (void)noargs;
    ffg_intr_refresh_hosts();
    return PyLong_FromLong(__atomic_load_n(&ffg_intr_nhosts, __ATOMIC_ACQUIRE));
}

PyMethodDef ffg_intr_methods[] = {
    {"_intr_refresh_hosts", ffg_m_intr_refresh_hosts, METH_NOARGS,
     "look again for the interpreter's, ctypes', cffi's and libffi's code (a stop is never made "
     "inside them); returns how many ranges are known"},
    {"_intr_setup", ffg_m_intr_setup, METH_VARARGS,
     "_intr_setup(signal.getsignal, signal.default_int_handler, main thread ident, factory)"},
    {"interrupt_signal", ffg_m_interrupt_signal, METH_NOARGS,
     "the real-time signal ffiguard's timers send (chosen and installed on first use)"},
    {"stopped", ffg_m_stopped, METH_NOARGS, "guarded calls stopped by Ctrl-C or a timeout so far"},
    {NULL, NULL, 0, NULL},
};
