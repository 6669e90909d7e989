/* ffiguard._core: Python bindings only.
 *
 * GuardedFunction is what users call. It forwards to the wrapped ctypes function
 * object through vectorcall, after arming this thread's guard, and afterwards tests
 * the thread's fault record (one TLS load and a compare) before returning: no Python
 * frame, no errcheck, on the path of every call.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE 1
#include <Python.h>

#include "state.h"

#include <dlfcn.h>
#include <link.h>
#include <errno.h>
#include <stddef.h>
#include <unwind.h>

#if PY_VERSION_HEX < 0x030A0000
#define Py_TPFLAGS_FFG_VECTORCALL _Py_TPFLAGS_HAVE_VECTORCALL
static inline PyObject *Py_NewRef(PyObject *o)
{
    Py_INCREF(o);
    return o;
}
static inline PyObject *Py_XNewRef(PyObject *o)
{
    Py_XINCREF(o);
    return o;
}
#else
#define Py_TPFLAGS_FFG_VECTORCALL Py_TPFLAGS_HAVE_VECTORCALL
#endif

static PyObject *fault_factory; /* ffiguard.faults.from_record, set at import */

static const char *const register_names[FFG_NREGS] = {FFG_REG_NAMES};
static const char *const access_names[] = {NULL, "read", "write", "execute"};

/* What happens to a library's functions after one of them faulted: shared by all the
 * functions of a library, tested on every call (one load and a branch). */
typedef struct {
    PyObject_HEAD
    int quarantined; /* further calls raise LibraryQuarantined until released */
    PyObject *on_fault; /* "raise", "quarantine" or "exit": read by the Python layer */
    PyObject *name;     /* the library's name, for messages */
} Policy;

static PyObject *quarantine_error; /* ffiguard.LibraryQuarantined, set at import */

static PyObject *policy_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "on_fault", NULL};
    PyObject *name, *on_fault;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:Policy", kwlist, &name, &on_fault))
        return NULL;
    Policy *self = (Policy *)type->tp_alloc(type, 0);
    if (self) {
        self->name = Py_NewRef(name);
        self->on_fault = Py_NewRef(on_fault);
    }
    return (PyObject *)self;
}

static int policy_traverse(Policy *self, visitproc visit, void *arg)
{
    Py_VISIT(self->name);
    Py_VISIT(self->on_fault);
    return 0;
}

static int policy_clear(Policy *self)
{
    Py_CLEAR(self->name);
    Py_CLEAR(self->on_fault);
    return 0;
}

static void policy_dealloc(Policy *self)
{
    PyObject_GC_UnTrack(self);
    policy_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *policy_get_quarantined(Policy *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->quarantined);
}

static int policy_set_quarantined(Policy *self, PyObject *value, void *closure)
{
    (void)closure;
    int v = value ? PyObject_IsTrue(value) : 0;
    if (v < 0)
        return -1;
    self->quarantined = v;
    return 0;
}

static PyObject *policy_get(PyObject *field) { return Py_NewRef(field); }
static PyObject *policy_get_name(Policy *self, void *closure) { (void)closure; return policy_get(self->name); }
static PyObject *policy_get_on_fault(Policy *self, void *closure) { (void)closure; return policy_get(self->on_fault); }

static int policy_set_on_fault(Policy *self, PyObject *value, void *closure)
{
    (void)closure;
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "on_fault cannot be deleted");
        return -1;
    }
    Py_XSETREF(self->on_fault, Py_NewRef(value));
    return 0;
}

static PyGetSetDef policy_getset[] = {
    {"quarantined", (getter)policy_get_quarantined, (setter)policy_set_quarantined, NULL, NULL},
    {"on_fault", (getter)policy_get_on_fault, (setter)policy_set_on_fault, NULL, NULL},
    {"name", (getter)policy_get_name, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject Policy_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ffiguard._core.Policy",
    .tp_doc = PyDoc_STR("Policy(name, on_fault): what a library's functions do after a fault"),
    .tp_basicsize = sizeof(Policy),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = policy_new,
    .tp_dealloc = (destructor)policy_dealloc,
    .tp_traverse = (traverseproc)policy_traverse,
    .tp_clear = (inquiry)policy_clear,
    .tp_getset = policy_getset,
};

typedef struct {
    PyObject_HEAD
    PyObject *wrapped; /* the ctypes function object */
    PyObject *name;    /* str, for reports */
    Policy *policy;    /* or NULL */
    uintptr_t target;  /* the foreign function its stub calls: what arming names */
    vectorcallfunc vectorcall;
} GuardedFunction;

static struct ffg_thread *thread_state(void)
{
    struct ffg_thread *t = ffg_tls;
    if (t)
        return t;
    t = ffg_thread_attach();
    if (!t)
        PyErr_SetFromErrno(PyExc_OSError);
    return t;
}

static PyObject *describe(uintptr_t pc);

/* The fault record as a tuple, cheap to make (the fault path is measured): (signal,
 * code, address or None, pc, sp, access or None, stack_overflow, frames as native
 * uint64 bytes, registers as native uint64 bytes, describe(pc)); faults.py names
 * these positions (REC_*), the only place that reads them.
 * ffiguard.faults turns it into the exception and decodes the rest only when asked.
 * Where pc is gets looked up now: the library could be unloaded before anyone asks. */
static PyObject *fault_as_tuple(const struct ffg_fault *r)
{
    PyObject *address = r->has_address ? PyLong_FromUnsignedLongLong(r->address) : Py_NewRef(Py_None);
    if (!address)
        return NULL;
    PyObject *where = describe(r->pc);
    if (!where) {
        Py_DECREF(address);
        return NULL;
    }
    return Py_BuildValue("(iiNKKzOy#y#N)", r->signo, r->code, address, (unsigned long long)r->pc,
                         (unsigned long long)r->sp,
                         access_names[r->access], r->stack_overflow ? Py_True : Py_False,
                         (const char *)r->pcs, (Py_ssize_t)(r->npcs * sizeof r->pcs[0]),
                         (const char *)r->regs, (Py_ssize_t)sizeof r->regs, where);
}

/* Turn this thread's pending fault into the exception, consuming the record. Whatever
 * the call produced meanwhile (a zero result, or an exception from restype conversion
 * or errcheck) is dropped; such an exception becomes the new one's __context__. */
static PyObject *raise_fault(GuardedFunction *self, struct ffg_thread *t, PyObject *result,
                             PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    struct ffg_fault copy = t->fault;
    t->fault.token = 0;
    Py_XDECREF(result);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type) {
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb)
            PyException_SetTraceback(value, tb);
    }
    PyObject *record = fault_as_tuple(&copy);
    PyObject *call_args = PyTuple_New((Py_ssize_t)(PyVectorcall_NARGS(nargsf) +
                                                   (kwnames ? PyTuple_GET_SIZE(kwnames) : 0)));
    if (call_args)
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(call_args); i++)
            PyTuple_SET_ITEM(call_args, i, Py_NewRef(args[i]));
    PyObject *policy = self->policy ? (PyObject *)self->policy : Py_None;
    PyObject *exc = record && call_args && fault_factory
                        ? PyObject_CallFunctionObjArgs(fault_factory, record, self->name, call_args,
                                                       kwnames ? kwnames : Py_None, policy, NULL)
                        : NULL;
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

/* Call the ctypes function. ctypes function objects have tp_call but no vectorcall, so
 * PyObject_Vectorcall would go through _PyObject_MakeTpCall (thread state lookup,
 * recursion check, result check: measured at ~2x our own cost per call). Positional
 * calls go to tp_call directly; the interpreter already checked recursion on the way
 * into this call, and ctypes' tp_call sets an exception whenever it returns NULL. */
static inline PyObject *call_wrapped(PyObject *wrapped, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames)
{
    ternaryfunc call = Py_TYPE(wrapped)->tp_call;
    if (__builtin_expect(kwnames != NULL || call == NULL, 0))
        return PyObject_Vectorcall(wrapped, args, nargsf, kwnames);
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    PyObject *tuple = PyTuple_New(n);
    if (!tuple)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(tuple, i, Py_NewRef(args[i]));
    PyObject *result = call(wrapped, tuple, NULL);
    Py_DECREF(tuple);
    return result;
}

static PyObject *gf_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    GuardedFunction *self = (GuardedFunction *)op;
    if (__builtin_expect(self->policy && self->policy->quarantined, 0))
        return PyErr_Format(quarantine_error, "%S is quarantined after a fault: %S not called "
                            "(release the library to call it again)", self->policy->name, self->name);
    struct ffg_thread *t = ffg_tls;
    if (__builtin_expect(t == NULL, 0) && !(t = thread_state()))
        return NULL;
    uintptr_t outer = t->armed; /* a GuardedFunction called during argument conversion */
    uint64_t outer_token = t->armed_token;
    uint64_t token = ++t->next_token;
    t->armed_token = token;
    t->armed = self->target; /* the thunk takes the arm into the guard frame and clears it */
    PyObject *result = call_wrapped(self->wrapped, args, nargsf, kwnames);
    t->armed = outer;
    t->armed_token = outer_token;
    if (__builtin_expect(__atomic_load_n(&t->fault.token, __ATOMIC_ACQUIRE) == token, 0))
        return raise_fault(self, t, result, args, nargsf, kwnames);
    return result;
}

static PyObject *gf_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"function", "name", "policy", "target", NULL};
    PyObject *wrapped, *name = NULL, *policy = NULL, *target = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OOO:GuardedFunction", kwlist, &wrapped, &name,
                                     &policy, &target))
        return NULL;
    uintptr_t target_address = 0;
    if (target && target != Py_None) {
        target_address = (uintptr_t)PyLong_AsVoidPtr(target);
        if (PyErr_Occurred())
            return NULL;
    }
    if (policy == Py_None)
        policy = NULL;
    if (policy && !PyObject_TypeCheck(policy, &Policy_Type)) {
        PyErr_SetString(PyExc_TypeError, "policy must be an ffiguard._core.Policy");
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
    self->policy = (Policy *)Py_XNewRef(policy);
    self->target = target_address;
    self->name = name && name != Py_None ? Py_NewRef(name) : PyObject_GetAttrString(wrapped, "__name__");
    if (!self->name) {
        PyErr_Clear();
        self->name = Py_NewRef(Py_None);
    }
    self->vectorcall = gf_vectorcall;
    return (PyObject *)self;
}

static int gf_traverse(GuardedFunction *self, visitproc visit, void *arg)
{
    Py_VISIT(self->wrapped);
    Py_VISIT(self->name);
    Py_VISIT(self->policy);
    return 0;
}

static int gf_clear(GuardedFunction *self)
{
    Py_CLEAR(self->wrapped);
    Py_CLEAR(self->name);
    Py_CLEAR(self->policy);
    return 0;
}

static void gf_dealloc(GuardedFunction *self)
{
    PyObject_GC_UnTrack(self);
    gf_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Our own attributes first (__wrapped__, _as_parameter_, __class__ ...), then the
 * ctypes function's: argtypes, restype, errcheck, __name__. */
static PyObject *gf_getattro(PyObject *op, PyObject *name)
{
    PyObject *v = PyObject_GenericGetAttr(op, name);
    if (v || !PyErr_ExceptionMatches(PyExc_AttributeError))
        return v;
    PyErr_Clear();
    return PyObject_GetAttr(((GuardedFunction *)op)->wrapped, name);
}

static int gf_setattro(PyObject *op, PyObject *name, PyObject *value)
{
    return PyObject_SetAttr(((GuardedFunction *)op)->wrapped, name, value);
}

static PyObject *gf_repr(GuardedFunction *self)
{
    return PyUnicode_FromFormat("<ffiguard.GuardedFunction %R wrapping %R>", self->name, self->wrapped);
}

static PyTypeObject GuardedFunction_Type;

/* A guarded function is the function it wraps, for == and hashing: lib.f == lib.f
 * across lookups, a cffi pointer cast from it (the stub's address) == it, and it finds
 * the same dict entries. Other comparisons: not defined, as for the wrapped object. */
static PyObject *gf_richcompare(PyObject *op, PyObject *other, int cmp)
{
    if (cmp != Py_EQ && cmp != Py_NE)
        Py_RETURN_NOTIMPLEMENTED;
    if (PyObject_TypeCheck(other, &GuardedFunction_Type))
        other = ((GuardedFunction *)other)->wrapped;
    return PyObject_RichCompare(((GuardedFunction *)op)->wrapped, other, cmp);
}

static Py_hash_t gf_hash(PyObject *op)
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

static PyObject *gf_get_wrapped(GuardedFunction *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->wrapped);
}

static PyObject *gf_get_name(GuardedFunction *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->name);
}

static PyObject *gf_get_policy(GuardedFunction *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->policy ? (PyObject *)self->policy : Py_None);
}

static PyGetSetDef gf_getset[] = {
    {"__policy__", (getter)gf_get_policy, NULL, "the library's fault policy, or None", NULL},
    {"__wrapped__", (getter)gf_get_wrapped, NULL, "the ctypes function object called", NULL},
    {"_as_parameter_", (getter)gf_get_wrapped, NULL,
     "lets ctypes accept a GuardedFunction wherever it accepts the function itself", NULL},
    {"__guarded_name__", (getter)gf_get_name, NULL, "the name used in fault reports", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject GuardedFunction_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ffiguard.GuardedFunction",
    .tp_doc = PyDoc_STR("GuardedFunction(function, name=None, policy=None, target=None)\n--\n\n"
                        "A ctypes function whose faults raise ffiguard.ForeignFault instead of "
                        "killing the process.\n`function` must already call a guard stub for `target` "
                        "(ffiguard.guard() arranges both).\nAttributes (argtypes, restype, errcheck, "
                        "...) are those of the wrapped function."),
    .tp_basicsize = sizeof(GuardedFunction),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_FFG_VECTORCALL,
    .tp_new = gf_new,
    .tp_dealloc = (destructor)gf_dealloc,
    .tp_traverse = (traverseproc)gf_traverse,
    .tp_clear = (inquiry)gf_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(GuardedFunction, vectorcall),
    .tp_getattro = gf_getattro,
    .tp_setattro = gf_setattro,
    .tp_repr = (reprfunc)gf_repr,
    .tp_richcompare = gf_richcompare,
    .tp_hash = gf_hash,
    .tp_getset = gf_getset,
};

/* ---- module functions --------------------------------------------------------------- */

static PyObject *m_stub(PyObject *mod, PyObject *arg)
{
    (void)mod;
    uintptr_t target = (uintptr_t)PyLong_AsVoidPtr(arg);
    if (PyErr_Occurred())
        return NULL;
    if (!target) {
        PyErr_SetString(PyExc_ValueError, "cannot guard a NULL function pointer");
        return NULL;
    }
    uintptr_t stub = ffg_stub_new(target);
    if (!stub)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromVoidPtr((void *)stub);
}

static PyObject *m_stub_target(PyObject *mod, PyObject *arg)
{
    (void)mod;
    uintptr_t stub = (uintptr_t)PyLong_AsVoidPtr(arg);
    if (PyErr_Occurred())
        return NULL;
    uintptr_t target = ffg_stub_target(stub);
    if (!target)
        Py_RETURN_NONE;
    return PyLong_FromVoidPtr((void *)target);
}

static PyObject *m_install(PyObject *mod, PyObject *arg)
{
    (void)mod;
    PyObject *seq = PySequence_Fast(arg, "install() takes a sequence of signal numbers");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int sigs[64];
    if (n > 64) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many signals");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        sigs[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (sigs[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    if (ffg_handlers_install(sigs, (int)n) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *m_untrap(PyObject *mod, PyObject *arg)
{
    (void)mod;
    long s = PyLong_AsLong(arg);
    if (s == -1 && PyErr_Occurred())
        return NULL;
    if (ffg_handlers_untrap((int)s) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *m_refresh(PyObject *mod, PyObject *unused)
{
    (void)mod, (void)unused;
    return PyLong_FromLong(ffg_handlers_refresh());
}

static PyObject *m_is_trapped(PyObject *mod, PyObject *arg)
{
    (void)mod;
    long s = PyLong_AsLong(arg);
    if (s == -1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(ffg_is_trapped((int)s));
}

static PyObject *m_recovered(PyObject *mod, PyObject *arg)
{
    (void)mod;
    long s = PyLong_AsLong(arg);
    if (s == -1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(ffg_recovered_count((int)s));
}

static PyObject *m_access_in_context(PyObject *mod, PyObject *unused)
{
    (void)mod, (void)unused;
    int v = ffg_access_in_context();
    if (v < 0)
        Py_RETURN_NONE;
    return PyBool_FromLong(v);
}

#if defined(__aarch64__) && !defined(FFG_NO_ARCH)
/* For the tests: the access kind a signal context with these extension records (the
 * bytes of uc_mcontext.__reserved) would give. qemu-user never writes an ESR record, so
 * the record walk is tested on synthetic frames. */
static PyObject *m_decode_access(PyObject *mod, PyObject *args)
{
    (void)mod;
    Py_buffer records;
    unsigned long long pc, address;
    if (!PyArg_ParseTuple(args, "y*KK:_decode_access", &records, &pc, &address))
        return NULL;
    static ucontext_t uc; /* 4 KiB of records: not on the stack; the GIL serialises */
    memset(&uc, 0, sizeof uc);
    size_t n = (size_t)records.len < sizeof uc.uc_mcontext.__reserved ? (size_t)records.len
                                                                       : sizeof uc.uc_mcontext.__reserved;
    memcpy(uc.uc_mcontext.__reserved, records.buf, n);
    PyBuffer_Release(&records);
    uc.uc_mcontext.pc = pc;
    int from_context;
    int access = ffg_uc_access(&uc, (uintptr_t)address, &from_context);
    return Py_BuildValue("(zO)", access_names[access], from_context ? Py_True : Py_False);
}
#endif

static PyObject *m_previous_snapshot(PyObject *mod, PyObject *unused)
{
    (void)mod, (void)unused;
    size_t size = ffg_prev_snapshot(NULL, 0);
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (b)
        ffg_prev_snapshot(PyBytes_AS_STRING(b), size);
    return b;
}

static PyObject *m_previous_restore(PyObject *mod, PyObject *arg)
{
    (void)mod;
    if (!PyBytes_Check(arg) || (size_t)PyBytes_GET_SIZE(arg) != ffg_prev_snapshot(NULL, 0)) {
        PyErr_SetString(PyExc_ValueError, "not a snapshot from previous_snapshot()");
        return NULL;
    }
    ffg_prev_restore(PyBytes_AS_STRING(arg));
    Py_RETURN_NONE;
}

/* (object path, object base, symbol or None, symbol address or 0) for pc, or None.
 * A symbol is named only when pc lies inside it (its size says so): dladdr alone names
 * the nearest exported symbol below pc, which for an unexported function is wrong. */
static PyObject *describe(uintptr_t pc)
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
    return Py_BuildValue("(sKzK)", info.dli_fname, (unsigned long long)(uintptr_t)info.dli_fbase,
                         info.dli_sname, (unsigned long long)start);
}

static PyObject *m_dladdr(PyObject *mod, PyObject *arg)
{
    (void)mod;
    uintptr_t pc = (uintptr_t)PyLong_AsVoidPtr(arg);
    if (PyErr_Occurred())
        return NULL;
    return describe(pc);
}

static PyObject *m_set_fault_factory(PyObject *mod, PyObject *arg)
{
    (void)mod;
    Py_XSETREF(fault_factory, Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyObject *m_set_quarantine_error(PyObject *mod, PyObject *arg)
{
    (void)mod;
    Py_XSETREF(quarantine_error, Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"set_quarantine_error", m_set_quarantine_error, METH_O, "set the LibraryQuarantined class"},
    {"stub", m_stub, METH_O, "stub(target) -> address of a new guard stub calling target"},
    {"stub_target", m_stub_target, METH_O, "stub_target(address) -> target, or None if not a stub"},
    {"install", m_install, METH_O, "install(signals): trap these signals"},
    {"untrap", m_untrap, METH_O, "untrap(signal): stop trapping it, put back what was there before"},
    {"refresh", m_refresh, METH_NOARGS, "put our handlers back on top; returns how many moved"},
    {"is_trapped", m_is_trapped, METH_O, "is_trapped(signum) -> bool"},
    {"recovered", m_recovered, METH_O, "recovered(signum or 0) -> faults recovered"},
    {"access_in_context", m_access_in_context, METH_NOARGS,
     "whether the last recovered SIGSEGV/SIGBUS had read/write/execute in its saved context "
     "(x86-64: always; AArch64: only with an ESR record, which qemu-user never writes); "
     "None before the first"},
#if defined(__aarch64__) && !defined(FFG_NO_ARCH)
    {"_decode_access", m_decode_access, METH_VARARGS,
     "_decode_access(records, pc, address) -> (access, from_context): tests only"},
#endif
    {"previous_snapshot", m_previous_snapshot, METH_NOARGS, "the chained handlers, as bytes"},
    {"previous_restore", m_previous_restore, METH_O, "restore previous_snapshot()"},
    {"dladdr", m_dladdr, METH_O, "dladdr(pc) -> (path, base, symbol, symbol_address) or None"},
    {"set_fault_factory", m_set_fault_factory, METH_O, "set the record -> exception callable"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ffiguard._core", "ffiguard's C core: stubs, thunk, fault handlers.",
    -1, methods, NULL, NULL, NULL, NULL,
};

static _Unwind_Reason_Code count_frame(struct _Unwind_Context *ctx, void *arg)
{
    (void)ctx;
    ++*(int *)arg;
    return _URC_NO_REASON;
}

static PyObject *register_tuple(void)
{
    PyObject *t = PyTuple_New(FFG_NREGS);
    for (int i = 0; t && i < FFG_NREGS; i++) {
        PyObject *name = PyUnicode_FromString(register_names[i]);
        if (!name) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, i, name);
    }
    return t;
}

PyMODINIT_FUNC PyInit__core(void)
{
    if (PyType_Ready(&GuardedFunction_Type) < 0 || PyType_Ready(&Policy_Type) < 0)
        return NULL;
    quarantine_error = Py_NewRef(PyExc_RuntimeError); /* until ffiguard sets its own */
    if (ffg_state_init() != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    /* Load and warm libgcc's unwinder now, not first inside a signal handler. */
    int depth = 0;
    _Unwind_Backtrace(count_frame, &depth);

    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&GuardedFunction_Type);
    Py_INCREF(&Policy_Type);
    if (PyModule_AddObject(m, "GuardedFunction", (PyObject *)&GuardedFunction_Type) < 0 ||
        PyModule_AddObject(m, "Policy", (PyObject *)&Policy_Type) < 0 ||
        PyModule_AddStringConstant(m, "ARCH", FFG_ARCH_NAME) < 0 ||
#ifdef FFG_NO_ARCH
        PyModule_AddIntConstant(m, "SUPPORTED", 0) < 0 ||
#else
        PyModule_AddIntConstant(m, "SUPPORTED", 1) < 0 ||
#endif
        PyModule_AddObject(m, "REGISTER_NAMES", register_tuple()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
