/* ffiguard.GuardedFunction: what users call, the hot path of every guarded call.
 *
 * It forwards to the wrapped ctypes (or cffi) function object after arming this
 * thread's guard, and afterwards tests the thread's fault record (one TLS load and a
 * compare) before returning: no Python frame, no errcheck, on the path of every call.
 */
#include "core.h"
#include "pyhost.h"
#include "shield.h" /* shield (issue 13) */

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <string.h>

PyObject *ffg_fault_factory;

/* Positions in the record tuple (faults.py's REC_*: keep both in step). */
#define REC_FRAMES_INDEX 7
#define REC_FIELD_COUNT 10

/* The fast way to the exception, set at import by ffiguard.faults (set_fault_types):
 * the class for each signal number, the stack-overflow class, the fallback class, and
 * the policy step (ffiguard.policy.after_fault). With them the exception is made here,
 * as faults.from_record would make it, without that Python frame. */
static struct {
    PyObject *classes;        /* dict: signal number -> class */
    PyObject *stack_overflow; /* ForeignStackOverflow */
    PyObject *fallback;       /* ForeignFault */
    PyObject *after_fault;    /* after_fault(exc, raw frames, policy) -> exc */
    PyObject *faults_globals; /* ffiguard.faults' namespace: shield_classify lives there */
    PyObject *key_shield;     /* "shield_classify": set, SIGSEGVs go to from_record */
    PyObject *key_raw, *key_values, *key_call, *key_function; /* interned attribute names */
    PyObject *key_default, *key_pending, *key_pending_max;   /* policy.py's globals */
    PyObject *empty; /* () */
} ffg_fast;

int ffg_set_fault_types(PyObject *classes, PyObject *stack_overflow, PyObject *fallback, PyObject *after_fault,
                        PyObject *faults_globals)
{
    if (!PyDict_Check(classes) || !PyType_Check(stack_overflow) || !PyType_Check(fallback) ||
        !PyCallable_Check(after_fault) || !PyDict_Check(faults_globals)) {
        PyErr_SetString(PyExc_TypeError, "set_fault_types(dict, type, type, callable, dict)");
        return -1;
    }
    PyObject *key;
    Py_ssize_t pos = 0;
    PyObject *value;
    while (PyDict_Next(classes, &pos, &key, &value)) {
        if (!PyLong_Check(key) || !PyType_Check(value) ||
            !PyType_IsSubtype((PyTypeObject *)value, (PyTypeObject *)PyExc_BaseException)) {
            PyErr_SetString(PyExc_TypeError, "set_fault_types: classes maps signal numbers to exception classes");
            return -1;
        }
    }
    if (!ffg_fast.key_raw) {
        ffg_fast.key_raw = PyUnicode_InternFromString("_raw");
        ffg_fast.key_values = PyUnicode_InternFromString("_values");
        ffg_fast.key_call = PyUnicode_InternFromString("_call");
        ffg_fast.key_function = PyUnicode_InternFromString("function");
        ffg_fast.key_shield = PyUnicode_InternFromString("shield_classify");
        ffg_fast.key_default = PyUnicode_InternFromString("_default");
        ffg_fast.key_pending = PyUnicode_InternFromString("_pending");
        ffg_fast.key_pending_max = PyUnicode_InternFromString("_PENDING_MAX");
        ffg_fast.empty = PyTuple_New(0);
        if (!ffg_fast.key_raw || !ffg_fast.key_values || !ffg_fast.key_call || !ffg_fast.key_function ||
            !ffg_fast.key_shield || !ffg_fast.key_default || !ffg_fast.key_pending ||
            !ffg_fast.key_pending_max || !ffg_fast.empty)
            return -1;
    }
    Py_XSETREF(ffg_fast.classes, PyDict_Copy(classes));
    if (!ffg_fast.classes)
        return -1;
    Py_XSETREF(ffg_fast.stack_overflow, Py_NewRef(stack_overflow));
    Py_XSETREF(ffg_fast.fallback, Py_NewRef(fallback));
    Py_XSETREF(ffg_fast.faults_globals, Py_NewRef(faults_globals));
    Py_XSETREF(ffg_fast.after_fault, Py_NewRef(after_fault));
    return 0;
}

/* Whether faults.from_record itself must make this fault's exception: a SIGSEGV while
 * shield mode's classifier is installed (it may be a ProtectionKeyViolation). 1, 0, or
 * -1 with an exception set. */
static int ffg_needs_from_record(const struct ffg_fault *r)
{
    if (r->signo != SIGSEGV)
        return 0;
    PyObject *hook = PyDict_GetItemWithError(ffg_fast.faults_globals, ffg_fast.key_shield); /* borrowed */
    if (!hook)
        return PyErr_Occurred() ? -1 : 0;
    return hook != Py_None;
}

/* policy.after_fault's common case in C: the policy is "raise" (the library's on_fault,
 * else the module's _default) and the suspect queue (_pending) has room: queue the raw
 * frames, and the exception is raised as it is. 1 done, 0 not this case (call
 * after_fault), -1 with an exception set. Reads policy.py's own globals, so the two
 * cannot disagree. */
static int ffg_fast_after_fault(PyObject *frames, PyObject *policy)
{
    PyObject *globals = PyFunction_Check(ffg_fast.after_fault) ? PyFunction_GetGlobals(ffg_fast.after_fault)
                                                               : NULL; /* borrowed */
    if (!globals)
        return 0;
    PyObject *mode = policy != Py_None ? ((ffg_Policy *)policy)->on_fault : Py_None;
    if (mode == Py_None && !(mode = PyDict_GetItemWithError(globals, ffg_fast.key_default)))
        return PyErr_Occurred() ? -1 : 0;
    if (!PyUnicode_Check(mode) || PyUnicode_CompareWithASCIIString(mode, "raise") != 0)
        return 0;
    PyObject *pending = PyDict_GetItemWithError(globals, ffg_fast.key_pending);
    PyObject *limit = pending ? PyDict_GetItemWithError(globals, ffg_fast.key_pending_max) : NULL;
    if (!limit)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyList_CheckExact(pending) || !PyLong_Check(limit) || PyList_GET_SIZE(pending) >= PyLong_AsSsize_t(limit))
        return PyErr_Occurred() ? -1 : 0;
    return PyList_Append(pending, frames) < 0 ? -1 : 1;
}

/* faults.from_record in C: cls.__new__(cls) (BaseException's: no __init__ runs), then
 * _raw, _values, _call in the instance's __dict__ (plain attributes of ForeignFault,
 * no descriptors: the same as setting them), then the policy step. New reference. */
static PyObject *ffg_fast_exception(const struct ffg_fault *r, PyObject *record, PyObject *name,
                                    PyObject *call_args, PyObject *kwnames, PyObject *policy)
{
    PyObject *cls = NULL;
    if (r->signo == SIGSEGV && r->stack_overflow) {
        cls = ffg_fast.stack_overflow;
    } else {
        PyObject *signo = PyLong_FromLong(r->signo);
        if (!signo)
            return NULL;
        cls = PyDict_GetItemWithError(ffg_fast.classes, signo); /* borrowed; the dict is ours */
        Py_DECREF(signo);
        if (!cls && PyErr_Occurred())
            return NULL;
        if (!cls)
            cls = ffg_fast.fallback;
    }
    PyTypeObject *type = (PyTypeObject *)cls;
    PyObject *exc = type->tp_new(type, ffg_fast.empty, NULL);
    if (!exc)
        return NULL;
    PyObject *dict = PyObject_GenericGetDict(exc, NULL);
    PyObject *values = PyDict_New();
    PyObject *call = PyTuple_Pack(2, call_args, kwnames ? kwnames : Py_None);
    int ok = dict && values && call && PyDict_SetItem(values, ffg_fast.key_function, name) == 0 &&
             PyDict_SetItem(dict, ffg_fast.key_raw, record) == 0 &&
             PyDict_SetItem(dict, ffg_fast.key_values, values) == 0 &&
             PyDict_SetItem(dict, ffg_fast.key_call, call) == 0;
    Py_XDECREF(dict);
    Py_XDECREF(values);
    Py_XDECREF(call);
    if (!ok) {
        Py_DECREF(exc);
        return NULL;
    }
    PyObject *frames = PyTuple_GET_ITEM(record, REC_FRAMES_INDEX);
    int done = ffg_fast_after_fault(frames, policy);
    if (done < 0) {
        Py_DECREF(exc);
        return NULL;
    }
    if (done)
        return exc;
    PyObject *result = PyObject_CallFunctionObjArgs(ffg_fast.after_fault, exc, frames, policy, NULL);
    Py_DECREF(exc);
    return result;
}
const char *const ffg_access_names[] = {NULL, "read", "write", "execute"};


typedef struct {
    PyObject_HEAD
    PyObject *wrapped; /* the ctypes function object */
    PyObject *name;    /* str, for reports */
    ffg_Policy *policy; /* or NULL */
    uintptr_t target;  /* the foreign function its stub calls: what arming names */
    vectorcallfunc vectorcall;
    int shield; /* shield (issue 13): lock shielded memory during its calls (default 1) */
    /* compiled cffi modules (issue 15): set when `wrapped` is a cffi lib's builtin, whose
     * C function (cffi's wrapper) is called as `cffi_stub` (cffi_api.inc) */
    int cffi_flags;                 /* the builtin's own METH_O / METH_NOARGS / METH_VARARGS */
    PyObject *cffi_self;            /* its m_self (the Lib), passed to the wrapper */
    uintptr_t cffi_stub;            /* the wrapper's guard stub (whole-wrapper mode: `target`
                                     * is the wrapper), or the wrapper itself (GOT mode:
                                     * `target` is the foreign function its GOT slot reaches) */
    vectorcallfunc cffi_vectorcall; /* its own vectorcall (NULL for METH_VARARGS) */
    int intr;   /* interrupt (issue 16): interruptible or timeout_ns: its calls take ffg_gf_call_intr */
    int interruptible;  /* Ctrl-C stops its calls (main thread) */
    int64_t timeout_ns; /* its calls are stopped after this long; 0: no timeout */
} GuardedFunction;

static struct ffg_thread *ffg_thread_state(void)
{
    struct ffg_thread *t = ffg_tls;
    if (t)
        return t;
    t = ffg_thread_attach();
    if (!t)
        PyErr_SetFromErrno(PyExc_OSError);
    return t;
}


/* The str for a C string that names something loaded (a library path, a symbol, an
 * access kind), from a small cache: a fault loop hits the same few names, and making
 * each str anew (decoding, hashing) was a measurable part of the fault path. An entry
 * is found by the C string's address and checked by its content (the address of a
 * name of an unloaded library may be reused for another). Normal context only; the
 * mutex makes it safe without the GIL (free-threaded builds). New reference, or NULL
 * with an exception set. */
#define FFG_STR_CACHE 16

static struct {
    const char *key;
    PyObject *bytes; /* the C string as it was: what a lookup compares */
    PyObject *str;   /* owned by the cache */
} ffg_str_cache[FFG_STR_CACHE];
static unsigned ffg_str_cache_next;
static pthread_mutex_t ffg_str_cache_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t ffg_str_cache_once = PTHREAD_ONCE_INIT;

/* A fork while another thread held the lock would leave it held in the child. */
static void ffg_str_cache_after_fork(void) { pthread_mutex_init(&ffg_str_cache_lock, NULL); }

static void ffg_str_cache_init(void) { pthread_atfork(NULL, NULL, ffg_str_cache_after_fork); }

static PyObject *ffg_cached_str(const char *s)
{
    PyObject *found = NULL;
    pthread_once(&ffg_str_cache_once, ffg_str_cache_init);
    pthread_mutex_lock(&ffg_str_cache_lock);
    for (int i = 0; i < FFG_STR_CACHE && !found; i++) {
        if (ffg_str_cache[i].key == s && strcmp(PyBytes_AS_STRING(ffg_str_cache[i].bytes), s) == 0)
            found = Py_NewRef(ffg_str_cache[i].str);
    }
    pthread_mutex_unlock(&ffg_str_cache_lock);
    if (found)
        return found;
    PyObject *str = PyUnicode_DecodeFSDefault(s); /* as os.fsdecode: any bytes */
    PyObject *bytes = str ? PyBytes_FromString(s) : NULL;
    if (!bytes) {
        Py_XDECREF(str);
        return NULL;
    }
    pthread_mutex_lock(&ffg_str_cache_lock);
    unsigned slot = ffg_str_cache_next++ % FFG_STR_CACHE;
    PyObject *old_str = ffg_str_cache[slot].str, *old_bytes = ffg_str_cache[slot].bytes;
    ffg_str_cache[slot].key = s;
    ffg_str_cache[slot].bytes = bytes;
    ffg_str_cache[slot].str = Py_NewRef(str);
    pthread_mutex_unlock(&ffg_str_cache_lock);
    Py_XDECREF(old_str); /* outside the lock: nothing runs under it but the copying */
    Py_XDECREF(old_bytes);
    return str;
}

/* The fault record as a tuple, cheap to make (the fault path is measured: built item
 * by item, no format string to parse): (signal,
 * code, address or None, pc, sp, access or None, stack_overflow, frames as native
 * uint64 bytes, registers as native uint64 bytes, ffg_describe(pc)); faults.py names
 * these positions (REC_*), the only place that reads them.
 * ffiguard.faults turns it into the exception and decodes the rest only when asked.
 * Where pc is gets looked up now: the library could be unloaded before anyone asks. */
static PyObject *ffg_fault_as_tuple(const struct ffg_fault *r)
{
    enum { REC_FIELDS = REC_FIELD_COUNT };
    PyObject *t = PyTuple_New(REC_FIELDS);
    if (!t)
        return NULL;
    const char *access = ffg_access_names[r->access];
    int npcs = r->npcs;
    PyObject *items[REC_FIELDS] = {
        PyLong_FromLong(r->signo),
        PyLong_FromLong(r->code),
        r->has_address ? PyLong_FromUnsignedLongLong(r->address) : Py_NewRef(Py_None),
        PyLong_FromUnsignedLongLong(r->pc),
        PyLong_FromUnsignedLongLong(r->sp),
        access ? ffg_cached_str(access) : Py_NewRef(Py_None),
        Py_NewRef(r->stack_overflow ? Py_True : Py_False),
        PyBytes_FromStringAndSize((const char *)r->pcs, (Py_ssize_t)(npcs * sizeof r->pcs[0])),
        PyBytes_FromStringAndSize((const char *)r->regs, (Py_ssize_t)sizeof r->regs),
        ffg_describe(r->pc),
    };
    int ok = 1;
    for (int i = 0; i < REC_FIELDS; i++) {
        if (!items[i])
            ok = 0;
        PyTuple_SET_ITEM(t, i, items[i] ? items[i] : Py_NewRef(Py_None));
    }
    if (!ok)
        Py_CLEAR(t); /* an exception is set */
    return t;
}

/* The pending fault of the call with this token, or NULL. Only looked at when some
 * fault is pending on the thread (npending): normally never. */
static struct ffg_fault *ffg_pending_fault(struct ffg_thread *t, uint64_t token)
{
    for (int i = 0; i < FFG_MAX_PENDING; i++)
        if (__atomic_load_n(&t->faults[i].token, __ATOMIC_ACQUIRE) == token)
            return &t->faults[i];
    return NULL;
}

/* Turn a pending fault into the exception, consuming the record. Whatever the call
 * produced meanwhile (a zero result, or an exception from restype conversion or
 * errcheck, which may itself be another guarded call's fault) is dropped; such an
 * exception becomes the new one's __context__. */
static PyObject *ffg_raise_fault(GuardedFunction *self, struct ffg_thread *t, struct ffg_fault *pending,
                                 PyObject *result, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    struct ffg_fault copy = *pending;
    __atomic_store_n(&pending->token, 0, __ATOMIC_RELEASE);
    __atomic_fetch_sub(&t->npending, 1, __ATOMIC_RELAXED);
    Py_XDECREF(result);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type) {
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb)
            PyException_SetTraceback(value, tb);
    }
    PyObject *record = ffg_fault_as_tuple(&copy);
    PyObject *call_args = PyTuple_New((Py_ssize_t)(PyVectorcall_NARGS(nargsf) +
                                                   (kwnames ? PyTuple_GET_SIZE(kwnames) : 0)));
    if (call_args)
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(call_args); i++)
            PyTuple_SET_ITEM(call_args, i, Py_NewRef(args[i]));
    PyObject *policy = self->policy ? (PyObject *)self->policy : Py_None;
    PyObject *exc = NULL;
    int slow = record && call_args && ffg_fast.after_fault ? ffg_needs_from_record(&copy) : 1;
    if (record && call_args && ffg_intr_is_stop(copy.signo)) /* interrupt (issue 16): a stop, not a fault */
        exc = ffg_intr_exception(record, self->name, call_args, kwnames, policy, self->timeout_ns);
    else if (slow < 0)
        ; /* the exception from the lookup stands */
    else if (!slow)
        exc = ffg_fast_exception(&copy, record, self->name, call_args, kwnames, policy);
    else if (record && call_args && ffg_fault_factory)
        exc = PyObject_CallFunctionObjArgs(ffg_fault_factory, record, self->name, call_args,
                                           kwnames ? kwnames : Py_None, policy, NULL);
    Py_XDECREF(record);
    Py_XDECREF(call_args);
    if (!exc && !PyErr_Occurred())
        PyErr_SetString(PyExc_SystemError, "ffiguard: fault factory not set");
    if (exc) {
        if (value)
            PyException_SetContext(exc, Py_NewRef(value));
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return NULL;
}

/* A call that cannot get a guard frame is not made: unguarded, its fault could not be
 * told from the enclosing guarded call's. */
static PyObject *ffg_too_deep(GuardedFunction *self)
{
    return PyErr_Format(PyExc_RecursionError,
                        "ffiguard: %S not called: %d guarded calls are already nested on this "
                        "thread (through callbacks), the most a thread can hold", self->name,
                        FFG_MAX_FRAMES);
}

/* Call the ctypes (or cffi) function. Their function objects have tp_call but no
 * vectorcall, so PyObject_Vectorcall would go through _PyObject_MakeTpCall (thread state
 * lookup, recursion check, result check: measured at ~2x our own cost per call), and
 * its recursion check would also move the interpreter position recorded at arming
 * (pyhost.h), which must be the same at a fault as at arming. So tp_call is called
 * directly, with a dict for keyword arguments; the interpreter already checked
 * recursion on the way into this call, and ctypes' tp_call sets an exception whenever
 * it returns NULL. */
static PyObject *ffg_call_with_keywords(PyObject *wrapped, PyObject *const *args, size_t nargsf,
                                        PyObject *kwnames) __attribute__((noinline, cold));

/* The positional arguments as a tuple (new reference), for tp_call. */
static inline __attribute__((always_inline)) PyObject *ffg_args_tuple(PyObject *const *args, Py_ssize_t n)
{
    PyObject *tuple = PyTuple_New(n);
    if (tuple)
        for (Py_ssize_t i = 0; i < n; i++)
            PyTuple_SET_ITEM(tuple, i, Py_NewRef(args[i]));
    return tuple;
}

static inline __attribute__((always_inline)) PyObject *
ffg_call_wrapped(PyObject *wrapped, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    ternaryfunc call = Py_TYPE(wrapped)->tp_call;
    if (__builtin_expect(kwnames != NULL || call == NULL, 0))
        return ffg_call_with_keywords(wrapped, args, nargsf, kwnames);
    PyObject *tuple = ffg_args_tuple(args, PyVectorcall_NARGS(nargsf));
    if (!tuple)
        return NULL;
    PyObject *result = call(wrapped, tuple, NULL);
    Py_DECREF(tuple);
    return result;
}

static PyObject *ffg_call_with_keywords(PyObject *wrapped, PyObject *const *args, size_t nargsf,
                                        PyObject *kwnames)
{
    ternaryfunc call = Py_TYPE(wrapped)->tp_call;
    if (call == NULL)
        return PyObject_Vectorcall(wrapped, args, nargsf, kwnames);
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    PyObject *tuple = ffg_args_tuple(args, n);
    if (!tuple)
        return NULL;
    PyObject *kwargs = PyDict_New();
    for (Py_ssize_t i = 0; kwargs && i < PyTuple_GET_SIZE(kwnames); i++)
        if (PyDict_SetItem(kwargs, PyTuple_GET_ITEM(kwnames, i), args[n + i]) < 0)
            Py_CLEAR(kwargs);
    PyObject *result = kwargs ? call(wrapped, tuple, kwargs) : NULL;
    Py_DECREF(tuple);
    Py_XDECREF(kwargs);
    return result;
}

/* After the call: the fault recorded for it, if any (one load and a branch). */
static inline PyObject *ffg_gf_finish(GuardedFunction *self, struct ffg_thread *t, uint64_t token,
                                      PyObject *result, PyObject *const *args, size_t nargsf,
                                      PyObject *kwnames)
{
    if (__builtin_expect(__atomic_load_n(&t->npending, __ATOMIC_ACQUIRE) != 0, 0)) {
        struct ffg_fault *pending = ffg_pending_fault(t, token);
        if (pending)
            return ffg_raise_fault(self, t, pending, result, args, nargsf, kwnames);
    }
    return result;
}

/* shield (issue 13, shield.c): how this call locks shielded memory. Protection keys: the
 * token's top bit makes the thunk lock PKRU around the foreign call; the fallback:
 * mprotect the regions around it. FFG_SHIELD_OFF when nothing is shielded (one load and
 * a branch), -1 with an exception set. */
static inline int ffg_gf_shield_begin(GuardedFunction *self, uint64_t *token)
{
    int shield = __atomic_load_n(&ffg_shield_mode, __ATOMIC_RELAXED);
    if (__builtin_expect(shield != FFG_SHIELD_OFF, 0)) {
        shield = self->shield ? shield : FFG_SHIELD_OFF;
        if (shield == FFG_SHIELD_PKEYS)
            *token |= FFG_SHIELD_TOKEN_BIT;
        else if (shield == FFG_SHIELD_FALLBACK && ffg_shield_fallback_lock() < 0)
            return -1;
    }
    return shield;
}

static inline void ffg_gf_shield_end(int shield)
{
    if (__builtin_expect(shield == FFG_SHIELD_FALLBACK, 0))
        ffg_shield_fallback_unlock();
}

/* Arm this thread for the call, make it, disarm, and raise its fault if it had one.
 * cffi (a constant, as intr): a compiled cffi module's builtin (cffi_api.inc), whose C
 * function (cffi's wrapper) is called through cffi_stub with cffi_arg, the argument as
 * the builtin takes it; otherwise the ctypes/cffi function object through its tp_call. */
static inline __attribute__((always_inline)) PyObject *
ffg_gf_guarded_call(GuardedFunction *self, struct ffg_thread *t, PyObject *cffi_arg, PyObject *const *args,
                    size_t nargsf, PyObject *kwnames, const int intr, const int cffi)
{
    uint64_t token = ++t->next_token;
    int shield = ffg_gf_shield_begin(self, &token);
    if (__builtin_expect(shield < 0, 0))
        return NULL;
    /* interrupt (issue 16): intr is the constant 0 on the plain path (compiled away). */
    struct ffg_intr_saved saved;
    if (intr && ffg_intr_begin(t, token, self->interruptible, self->timeout_ns, &saved) < 0) {
        ffg_gf_shield_end(shield);
        return NULL;
    }
    PyThreadState *ts = ffg_py_attached(); /* ours: the caller holds the GIL / is attached */
    t->armed_token = token;
    ffg_py_position(ts, &t->armed_host);
    t->armed = self->target; /* the thunk takes the arm into the guard frame and clears it */
    PyObject *result = cffi ? ((PyCFunction)self->cffi_stub)(self->cffi_self, cffi_arg)
                            : ffg_call_wrapped(self->wrapped, args, nargsf, kwnames);
    t->armed = 0;
    /* A compiled module in whole-wrapper mode: a recovery or a stop (only ever made with
     * the thread detached) skipped the rest of cffi's wrapper, which re-attaches it. */
    if (cffi && (intr || __atomic_load_n(&t->npending, __ATOMIC_ACQUIRE) != 0) && ffg_py_attached() != ts)
        PyEval_RestoreThread(ts);
    if (intr)
        ffg_intr_end(t, token, &saved); /* interrupt: disarm; a deferred stop becomes its record */
    ffg_gf_shield_end(shield);
    return ffg_gf_finish(self, t, token, result, args, nargsf, kwnames);
}

/* A GuardedFunction called while another one is armed: from argument conversion (a
 * from_param or _as_parameter_ running Python code) between the outer call's arming and
 * its foreign call. The outer arm is put back afterwards. */
static __attribute__((noinline, cold)) PyObject *
ffg_gf_call_nested(GuardedFunction *self, struct ffg_thread *t, PyObject *cffi_arg, PyObject *const *args,
                   size_t nargsf, PyObject *kwnames, int intr, int cffi)
{
    uintptr_t outer = t->armed;
    uint64_t outer_token = t->armed_token;
    struct ffg_host outer_host = t->armed_host;
    PyObject *result = ffg_gf_guarded_call(self, t, cffi_arg, args, nargsf, kwnames, intr, cffi);
    t->armed = outer;
    t->armed_token = outer_token;
    t->armed_host = outer_host;
    return result;
}

/* interrupt (issue 16): a call that Ctrl-C or a timeout may stop (interrupt.c). */
static __attribute__((noinline, cold)) PyObject *
ffg_gf_call_intr(GuardedFunction *self, struct ffg_thread *t, PyObject *cffi_arg, PyObject *const *args,
                 size_t nargsf, PyObject *kwnames, int cffi)
{
    if (t->armed != 0)
        return ffg_gf_call_nested(self, t, cffi_arg, args, nargsf, kwnames, 1, cffi);
    return ffg_gf_guarded_call(self, t, cffi_arg, args, nargsf, kwnames, 1, cffi);
}

/* NULL + LibraryQuarantined when the function's library is quarantined. */
static __attribute__((noinline, cold)) PyObject *ffg_gf_quarantined(GuardedFunction *self)
{
    return PyErr_Format(ffg_quarantine_error, "%S is quarantined after a fault: %S not called "
                        "(release the library to call it again)", self->policy->name, self->name);
}

static inline int ffg_gf_is_quarantined(GuardedFunction *self)
{
    return __builtin_expect(self->policy && __atomic_load_n(&self->policy->quarantined, __ATOMIC_RELAXED), 0);
}

/* The guarded call, from either kind of caller (see ffg_gf_guarded_call). */
static inline __attribute__((always_inline)) PyObject *
ffg_gf_call(GuardedFunction *self, PyObject *cffi_arg, PyObject *const *args, size_t nargsf,
            PyObject *kwnames, const int cffi)
{
    struct ffg_thread *t = ffg_tls;
    if (__builtin_expect(t == NULL, 0) && !(t = ffg_thread_state()))
        return NULL;
    if (__builtin_expect(t->top >= t->end, 0))
        return ffg_too_deep(self);
    if (__builtin_expect(self->intr != 0, 0)) /* interrupt (issue 16) */
        return ffg_gf_call_intr(self, t, cffi_arg, args, nargsf, kwnames, cffi);
    if (__builtin_expect(t->armed != 0, 0))
        return ffg_gf_call_nested(self, t, cffi_arg, args, nargsf, kwnames, 0, cffi);
    return ffg_gf_guarded_call(self, t, cffi_arg, args, nargsf, kwnames, 0, cffi);
}

static PyObject *ffg_gf_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    GuardedFunction *self = (GuardedFunction *)op;
    if (ffg_gf_is_quarantined(self))
        return ffg_gf_quarantined(self);
    return ffg_gf_call(self, NULL, args, nargsf, kwnames, 0);
}

#include "cffi_api.inc" /* compiled cffi modules (issue 15): the builtin call path */

static PyObject *ffg_gf_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"function", "name", "policy", "target", "shield", "interruptible", "timeout", NULL};
    PyObject *wrapped, *name = NULL, *policy = NULL, *target = NULL, *timeout = NULL;
    int shield = 1; /* shield (issue 13) */
    int interruptible = 0; /* interrupt (issue 16) */
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OOOppO:GuardedFunction", kwlist, &wrapped, &name,
                                     &policy, &target, &shield, &interruptible, &timeout))
        return NULL;
    int64_t timeout_ns = 0;
    if (ffg_intr_timeout_ns(timeout, &timeout_ns) < 0)
        return NULL;
    uintptr_t target_address = 0;
    if (target && target != Py_None) {
        target_address = (uintptr_t)PyLong_AsVoidPtr(target);
        if (PyErr_Occurred())
            return NULL;
    }
    if (policy == Py_None)
        policy = NULL;
    if (policy && !PyObject_TypeCheck(policy, &ffg_Policy_Type)) {
        PyErr_SetString(PyExc_TypeError, "policy must be an ffiguard._core.Policy");
        return NULL;
    }
    if (PyInterpreterState_Get() != PyInterpreterState_Main()) {
        PyErr_SetString(PyExc_RuntimeError, "ffiguard guards foreign calls in the main interpreter "
                        "only, not in a sub-interpreter");
        return NULL;
    }
    if (!PyCallable_Check(wrapped)) {
        PyErr_Format(PyExc_TypeError, "GuardedFunction needs a callable ctypes function, not %.200s",
                     Py_TYPE(wrapped)->tp_name);
        return NULL;
    }
    GuardedFunction *self = (GuardedFunction *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    self->wrapped = Py_NewRef(wrapped);
    self->policy = (ffg_Policy *)Py_XNewRef(policy);
    self->target = target_address;
    self->name = name && name != Py_None ? Py_NewRef(name) : PyObject_GetAttrString(wrapped, "__name__");
    if (!self->name) {
        PyErr_Clear();
        self->name = Py_NewRef(Py_None);
    }
    self->vectorcall = ffg_gf_vectorcall;
    self->shield = shield; /* shield (issue 13) */
    self->interruptible = interruptible; /* interrupt (issue 16) */
    self->timeout_ns = timeout_ns;
    self->intr = interruptible || timeout_ns;
    return (PyObject *)self;
}

static int ffg_gf_traverse(GuardedFunction *self, visitproc visit, void *arg)
{
    Py_VISIT(self->wrapped);
    Py_VISIT(self->name);
    Py_VISIT(self->policy);
    Py_VISIT(self->cffi_self); /* compiled cffi modules (issue 15) */
    return 0;
}

static int ffg_gf_clear(GuardedFunction *self)
{
    Py_CLEAR(self->wrapped);
    Py_CLEAR(self->name);
    Py_CLEAR(self->policy);
    Py_CLEAR(self->cffi_self); /* compiled cffi modules (issue 15) */
    return 0;
}

static void ffg_gf_dealloc(GuardedFunction *self)
{
    PyObject_GC_UnTrack(self);
    ffg_gf_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Our own attributes first (__wrapped__, _as_parameter_, __class__ ...), then the
 * ctypes function's: argtypes, restype, errcheck, __name__. */
static PyObject *ffg_gf_getattro(PyObject *op, PyObject *name)
{
    PyObject *v = PyObject_GenericGetAttr(op, name);
    if (v || !PyErr_ExceptionMatches(PyExc_AttributeError))
        return v;
    PyErr_Clear();
    return PyObject_GetAttr(((GuardedFunction *)op)->wrapped, name);
}

static int ffg_gf_setattro(PyObject *op, PyObject *name, PyObject *value)
{
    /* interrupt (issue 16): per-function timeout and interruptible are ours */
    if (PyUnicode_Check(name) && (PyUnicode_CompareWithASCIIString(name, "timeout") == 0 ||
                                  PyUnicode_CompareWithASCIIString(name, "interruptible") == 0))
        return PyObject_GenericSetAttr(op, name, value);
    return PyObject_SetAttr(((GuardedFunction *)op)->wrapped, name, value);
}

static PyObject *ffg_gf_repr(GuardedFunction *self)
{
    return PyUnicode_FromFormat("<ffiguard.GuardedFunction %R wrapping %R>", self->name, self->wrapped);
}


/* A guarded function is the function it wraps, for == and hashing: lib.f == lib.f
 * across lookups, a cffi pointer cast from it (the stub's address) == it, and it finds
 * the same dict entries. Other comparisons: not defined, as for the wrapped object. */
static PyObject *ffg_gf_richcompare(PyObject *op, PyObject *other, int cmp)
{
    if (cmp != Py_EQ && cmp != Py_NE)
        Py_RETURN_NOTIMPLEMENTED;
    if (PyObject_TypeCheck(other, &ffg_GuardedFunction_Type))
        other = ((GuardedFunction *)other)->wrapped;
    return PyObject_RichCompare(((GuardedFunction *)op)->wrapped, other, cmp);
}

static Py_hash_t ffg_gf_hash(PyObject *op)
{
    /* cffi's cdata hash by address; ctypes' function objects are unhashable but compare
     * by identity, so hash those by identity (a guarded function stays usable as a key). */
    PyObject *wrapped = ((GuardedFunction *)op)->wrapped;
    Py_hash_t h = PyObject_Hash(wrapped);
    if (h == -1 && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        h = (Py_hash_t)((uintptr_t)wrapped >> 4);
        if (h == -1)
            h = -2;
    }
    return h;
}

static PyObject *ffg_gf_get_wrapped(GuardedFunction *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->wrapped);
}

static PyObject *ffg_gf_get_name(GuardedFunction *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->name);
}

static PyObject *ffg_gf_get_policy(GuardedFunction *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->policy ? (PyObject *)self->policy : Py_None);
}

static PyObject *ffg_gf_get_shield(GuardedFunction *self, void *closure) /* shield (issue 13) */
{
    (void)closure;
    return PyBool_FromLong(self->shield);
}

/* interrupt (issue 16): lib.f.timeout (seconds or None, as isolate's) and
 * lib.f.interruptible. Written whole; a call reads them once, at its start. */
static PyObject *ffg_gf_get_timeout(GuardedFunction *self, void *closure)
{
    (void)closure;
    if (!self->timeout_ns)
        Py_RETURN_NONE;
    return PyFloat_FromDouble((double)self->timeout_ns / FFG_NS_PER_S);
}

static int ffg_gf_set_timeout(GuardedFunction *self, PyObject *value, void *closure)
{
    (void)closure;
    int64_t ns = 0;
    if (ffg_intr_timeout_ns(value, &ns) < 0)
        return -1;
    self->timeout_ns = ns;
    self->intr = self->interruptible || ns;
    return 0;
}

static PyObject *ffg_gf_get_interruptible(GuardedFunction *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->interruptible);
}

static int ffg_gf_set_interruptible(GuardedFunction *self, PyObject *value, void *closure)
{
    (void)closure;
    int on = value ? PyObject_IsTrue(value) : 0;
    if (on < 0)
        return -1;
    self->interruptible = on;
    self->intr = on || self->timeout_ns;
    return 0;
}

static PyGetSetDef ffg_gf_getset[] = {
    {"timeout", (getter)ffg_gf_get_timeout, (setter)ffg_gf_set_timeout,
     "seconds after which a call is stopped (ForeignTimeout), or None", NULL},
    {"interruptible", (getter)ffg_gf_get_interruptible, (setter)ffg_gf_set_interruptible,
     "whether Ctrl-C stops a call (on the main thread)", NULL},
    {"__shield__", (getter)ffg_gf_get_shield, NULL, "whether its calls lock shielded memory", NULL},
    {"__policy__", (getter)ffg_gf_get_policy, NULL, "the library's fault policy, or None", NULL},
    {"__wrapped__", (getter)ffg_gf_get_wrapped, NULL, "the ctypes function object called", NULL},
    {"_as_parameter_", (getter)ffg_gf_get_wrapped, NULL,
     "lets ctypes accept a GuardedFunction wherever it accepts the function itself", NULL},
    {"__guarded_name__", (getter)ffg_gf_get_name, NULL, "the name used in fault reports", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject ffg_GuardedFunction_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ffiguard.GuardedFunction",
    .tp_doc = PyDoc_STR("GuardedFunction(function, name=None, policy=None, target=None)\n--\n\n"
                        "A ctypes function whose faults raise ffiguard.ForeignFault instead of "
                        "killing the process.\n`function` must already call a guard stub for `target` "
                        "(ffiguard.guard() arranges both).\nAttributes (argtypes, restype, errcheck, "
                        "...) are those of the wrapped function."),
    .tp_basicsize = sizeof(GuardedFunction),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = ffg_gf_new,
    .tp_dealloc = (destructor)ffg_gf_dealloc,
    .tp_traverse = (traverseproc)ffg_gf_traverse,
    .tp_clear = (inquiry)ffg_gf_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(GuardedFunction, vectorcall),
    .tp_getattro = ffg_gf_getattro,
    .tp_setattro = ffg_gf_setattro,
    .tp_repr = (reprfunc)ffg_gf_repr,
    .tp_richcompare = ffg_gf_richcompare,
    .tp_hash = ffg_gf_hash,
    .tp_getset = ffg_gf_getset,
};


/* (object path, object base, symbol or None, symbol address or 0) for pc, or None.
 * A symbol is named only when pc lies inside it (its size says so): dladdr alone names
 * the nearest exported symbol below pc, which for an unexported function is wrong. */
PyObject *ffg_describe(uintptr_t pc)
{
    Dl_info info;
    const ElfW(Sym) *sym = NULL;
    if (!pc || !dladdr1((void *)pc, &info, (void **)&sym, RTLD_DL_SYMENT) || !info.dli_fname)
        Py_RETURN_NONE;
    uintptr_t start = (uintptr_t)info.dli_saddr;
    if (!info.dli_sname || !sym || pc >= start + (sym->st_size ? sym->st_size : 1)) {
        info.dli_sname = NULL;
        start = 0;
    }
    PyObject *path = ffg_cached_str(info.dli_fname);
    PyObject *symbol = info.dli_sname ? ffg_cached_str(info.dli_sname) : Py_NewRef(Py_None);
    PyObject *base = PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)info.dli_fbase);
    PyObject *symbol_address = PyLong_FromUnsignedLongLong((unsigned long long)start);
    if (!path || !symbol || !base || !symbol_address) {
        Py_XDECREF(path);
        Py_XDECREF(symbol);
        Py_XDECREF(base);
        Py_XDECREF(symbol_address);
        return NULL;
    }
    PyObject *t = PyTuple_New(4);
    if (!t) {
        Py_DECREF(path);
        Py_DECREF(symbol);
        Py_DECREF(base);
        Py_DECREF(symbol_address);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, path);
    PyTuple_SET_ITEM(t, 1, base);
    PyTuple_SET_ITEM(t, 2, symbol);
    PyTuple_SET_ITEM(t, 3, symbol_address);
    return t;
}
