/* ffiguard._core: the module's functions and its initialisation. The types live in
 * guarded.c and policy.c; the signal handlers in handler.c and chain.c. */
#include "core.h"

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <unwind.h>

static const char *const ffg_register_names[FFG_NREGS] = {FFG_REG_NAMES};

/* Installing, untrapping and refreshing the handlers, and saving or restoring the
 * chained ones (chain.c), were serialised by the GIL; the free-threaded build has none,
 * so these calls take this lock. Normal context only (the signal handler never takes
 * it), and nothing called under it calls back into Python. */
static pthread_mutex_t ffg_handlers_lock = PTHREAD_MUTEX_INITIALIZER;

/* ---- module functions --------------------------------------------------------------- */

static PyObject *ffg_m_stub(PyObject *mod, PyObject *arg)
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

static PyObject *ffg_m_stub_target(PyObject *mod, PyObject *arg)
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

static PyObject *ffg_m_install(PyObject *mod, PyObject *arg)
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
    int rc, saved_errno;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&ffg_handlers_lock);
    rc = ffg_handlers_install(sigs, (int)n);
    saved_errno = errno;
    pthread_mutex_unlock(&ffg_handlers_lock);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        errno = saved_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *ffg_m_untrap(PyObject *mod, PyObject *arg)
{
    (void)mod;
    long s = PyLong_AsLong(arg);
    if (s == -1 && PyErr_Occurred())
        return NULL;
    int rc, saved_errno;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&ffg_handlers_lock);
    rc = ffg_handlers_untrap((int)s);
    saved_errno = errno;
    pthread_mutex_unlock(&ffg_handlers_lock);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        errno = saved_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *ffg_m_refresh(PyObject *mod, PyObject *unused)
{
    (void)mod, (void)unused;
    int moved;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&ffg_handlers_lock);
    moved = ffg_handlers_refresh();
    pthread_mutex_unlock(&ffg_handlers_lock);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(moved);
}

static PyObject *ffg_m_is_trapped(PyObject *mod, PyObject *arg)
{
    (void)mod;
    long s = PyLong_AsLong(arg);
    if (s == -1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(ffg_is_trapped((int)s));
}

static PyObject *ffg_m_recovered(PyObject *mod, PyObject *arg)
{
    (void)mod;
    long s = PyLong_AsLong(arg);
    if (s == -1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(ffg_recovered_count((int)s));
}

static PyObject *ffg_m_access_in_context(PyObject *mod, PyObject *unused)
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
static PyObject *ffg_m_decode_access(PyObject *mod, PyObject *args)
{
    (void)mod;
    Py_buffer records;
    unsigned long long pc, address;
    if (!PyArg_ParseTuple(args, "y*KK:_decode_access", &records, &pc, &address))
        return NULL;
    /* 4 KiB of records: not on the stack, and not a static (no GIL to serialise it) */
    ucontext_t *uc = PyMem_Calloc(1, sizeof *uc);
    if (!uc) {
        PyBuffer_Release(&records);
        return PyErr_NoMemory();
    }
    size_t n = (size_t)records.len < sizeof uc->uc_mcontext.__reserved ? (size_t)records.len
                                                                        : sizeof uc->uc_mcontext.__reserved;
    memcpy(uc->uc_mcontext.__reserved, records.buf, n);
    PyBuffer_Release(&records);
    uc->uc_mcontext.pc = pc;
    int from_context;
    int access = ffg_uc_access(uc, (uintptr_t)address, &from_context);
    PyMem_Free(uc);
    return Py_BuildValue("(zO)", ffg_access_names[access], from_context ? Py_True : Py_False);
}
#endif

static PyObject *ffg_m_previous_snapshot(PyObject *mod, PyObject *unused)
{
    (void)mod, (void)unused;
    size_t size = ffg_prev_snapshot(NULL, 0);
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (b) {
        pthread_mutex_lock(&ffg_handlers_lock); /* pure C under it: the GIL can stay */
        ffg_prev_snapshot(PyBytes_AS_STRING(b), size);
        pthread_mutex_unlock(&ffg_handlers_lock);
    }
    return b;
}

static PyObject *ffg_m_previous_restore(PyObject *mod, PyObject *arg)
{
    (void)mod;
    if (!PyBytes_Check(arg) || (size_t)PyBytes_GET_SIZE(arg) != ffg_prev_snapshot(NULL, 0)) {
        PyErr_SetString(PyExc_ValueError, "not a snapshot from previous_snapshot()");
        return NULL;
    }
    pthread_mutex_lock(&ffg_handlers_lock); /* pure C under it: the GIL can stay */
    ffg_prev_restore(PyBytes_AS_STRING(arg));
    pthread_mutex_unlock(&ffg_handlers_lock);
    Py_RETURN_NONE;
}
static PyObject *ffg_m_dladdr(PyObject *mod, PyObject *arg)
{
    (void)mod;
    uintptr_t pc = (uintptr_t)PyLong_AsVoidPtr(arg);
    if (PyErr_Occurred())
        return NULL;
    return ffg_describe(pc);
}

static PyObject *ffg_m_set_fault_factory(PyObject *mod, PyObject *arg)
{
    (void)mod;
    Py_XSETREF(ffg_fault_factory, Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyObject *ffg_m_set_quarantine_error(PyObject *mod, PyObject *arg)
{
    (void)mod;
    Py_XSETREF(ffg_quarantine_error, Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyMethodDef ffg_methods[] = {
    {"set_quarantine_error", ffg_m_set_quarantine_error, METH_O, "set the LibraryQuarantined class"},
    {"stub", ffg_m_stub, METH_O, "stub(target) -> address of a new guard stub calling target"},
    {"stub_target", ffg_m_stub_target, METH_O, "stub_target(address) -> target, or None if not a stub"},
    {"install", ffg_m_install, METH_O, "install(signals): trap these signals"},
    {"untrap", ffg_m_untrap, METH_O, "untrap(signal): stop trapping it, put back what was there before"},
    {"refresh", ffg_m_refresh, METH_NOARGS, "put our handlers back on top; returns how many moved"},
    {"is_trapped", ffg_m_is_trapped, METH_O, "is_trapped(signum) -> bool"},
    {"recovered", ffg_m_recovered, METH_O, "recovered(signum or 0) -> faults recovered"},
    {"access_in_context", ffg_m_access_in_context, METH_NOARGS,
     "whether the last recovered SIGSEGV/SIGBUS had read/write/execute in its saved context "
     "(x86-64: always; AArch64: only with an ESR record, which qemu-user never writes); "
     "None before the first"},
#if defined(__aarch64__) && !defined(FFG_NO_ARCH)
    {"_decode_access", ffg_m_decode_access, METH_VARARGS,
     "_decode_access(records, pc, address) -> (access, from_context): tests only"},
#endif
    {"previous_snapshot", ffg_m_previous_snapshot, METH_NOARGS, "the chained handlers, as bytes"},
    {"previous_restore", ffg_m_previous_restore, METH_O, "restore previous_snapshot()"},
    {"dladdr", ffg_m_dladdr, METH_O, "dladdr(pc) -> (path, base, symbol, symbol_address) or None"},
    {"set_fault_factory", ffg_m_set_fault_factory, METH_O, "set the record -> exception callable"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef ffg_module = {
    PyModuleDef_HEAD_INIT, "ffiguard._core", "ffiguard's C core: stubs, thunk, fault handlers.",
    -1, ffg_methods, NULL, NULL, NULL, NULL,
};

static _Unwind_Reason_Code ffg_count_frame(struct _Unwind_Context *ctx, void *arg)
{
    (void)ctx;
    ++*(int *)arg;
    return _URC_NO_REASON;
}

static PyObject *ffg_register_tuple(void)
{
    PyObject *t = PyTuple_New(FFG_NREGS);
    for (int i = 0; t && i < FFG_NREGS; i++) {
        PyObject *name = PyUnicode_FromString(ffg_register_names[i]);
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
    if (PyType_Ready(&ffg_GuardedFunction_Type) < 0 || PyType_Ready(&ffg_Policy_Type) < 0)
        return NULL;
    ffg_quarantine_error = Py_NewRef(PyExc_RuntimeError); /* until ffiguard sets its own */
    if (ffg_state_init() != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    /* Load and warm libgcc's unwinder now, not first inside a signal handler. */
    int depth = 0;
    _Unwind_Backtrace(ffg_count_frame, &depth);

    PyObject *m = PyModule_Create(&ffg_module);
    if (!m)
        return NULL;
#ifdef Py_GIL_DISABLED
    /* Free-threaded CPython: declare that the core needs no GIL (else importing it turns
     * the GIL back on, with a RuntimeWarning). What the GIL used to serialise is locked
     * or atomic now: stub allocation (stubs.c), handler installation (ffg_handlers_lock
     * above); the per-thread guard state was never shared. */
    if (PyUnstable_Module_SetGIL(m, Py_MOD_GIL_NOT_USED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#endif
    Py_INCREF(&ffg_GuardedFunction_Type);
    Py_INCREF(&ffg_Policy_Type);
    if (PyModule_AddObject(m, "GuardedFunction", (PyObject *)&ffg_GuardedFunction_Type) < 0 ||
        PyModule_AddObject(m, "Policy", (PyObject *)&ffg_Policy_Type) < 0 ||
        PyModule_AddStringConstant(m, "ARCH", FFG_ARCH_NAME) < 0 ||
#ifdef FFG_NO_ARCH
        PyModule_AddIntConstant(m, "SUPPORTED", 0) < 0 ||
#else
        PyModule_AddIntConstant(m, "SUPPORTED", 1) < 0 ||
#endif
        PyModule_AddObject(m, "REGISTER_NAMES", ffg_register_tuple()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

