/* ffiguard._core: the module's functions and its initialisation. The types live in
 * guarded.c and policy.c; the signal handlers in handler.c and chain.c. */
#include "core.h"
#include "shield.h" /* shield (issue 13) */

#include <errno.h>
#include <pthread.h>
#include <stddef.h>

static const char *const ffg_register_names[FFG_NREGS] = {FFG_REG_NAMES};
/* issue 15: the registers a signal not caused by an instruction did not set (see the
 * arch header), NULL-terminated. */
static const char *const ffg_trap_register_names[] = {FFG_TRAP_REG_NAMES NULL};
static const char *const ffg_page_fault_register_names[] = {FFG_PAGE_FAULT_REG_NAMES NULL};

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

/* A signal number argument: an int in lowest..64, else TypeError (not an integer),
 * OverflowError (beyond a C long) or ValueError, never a silently truncated number. */
static int ffg_signal_arg(PyObject *arg, int lowest)
{
    PyObject *index = PyNumber_Index(arg);
    if (!index)
        return -1;
    int overflow = 0;
    long s = PyLong_AsLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (s == -1 && PyErr_Occurred())
        return -1;
    if (overflow) {
        PyErr_Format(PyExc_OverflowError, "signal number out of range (%d..%d)", lowest, FFG_NSIGNALS - 1);
        return -1;
    }
    if (s < lowest || s >= FFG_NSIGNALS) {
        PyErr_Format(PyExc_ValueError, "signal number %ld out of range (%d..%d)", s, lowest, FFG_NSIGNALS - 1);
        return -1;
    }
    return (int)s;
}

static PyObject *ffg_m_install(PyObject *mod, PyObject *arg)
{
    (void)mod;
    PyObject *seq = PySequence_Fast(arg, "install() takes a sequence of signal numbers");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int sigs[FFG_NSIGNALS];
    if (n >= FFG_NSIGNALS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many signals");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        sigs[i] = ffg_signal_arg(PySequence_Fast_GET_ITEM(seq, i), 1);
        if (sigs[i] < 0) {
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
    int s = ffg_signal_arg(arg, 1);
    if (s < 0)
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
    int s = ffg_signal_arg(arg, 1);
    if (s < 0)
        return NULL;
    return PyBool_FromLong(ffg_is_trapped(s));
}

static PyObject *ffg_m_recovered(PyObject *mod, PyObject *arg)
{
    (void)mod;
    int s = ffg_signal_arg(arg, 0); /* 0: all signals */
    if (s < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(ffg_recovered_count(s));
}

/* The handler installed for every signal now, as addresses (index: signal number). */
static PyObject *ffg_m_handlers(PyObject *mod, PyObject *unused)
{
    (void)mod, (void)unused;
    PyObject *t = PyTuple_New(FFG_NSIGNALS);
    for (int s = 0; t && s < FFG_NSIGNALS; s++) {
        PyObject *v = PyLong_FromSize_t(s ? ffg_handler_now(s) : 0);
        if (!v) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, s, v);
    }
    return t;
}

static PyObject *ffg_m_after_faulthandler(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *before;
    int enabled;
    if (!PyArg_ParseTuple(args, "O!p:after_faulthandler", &PyTuple_Type, &before, &enabled))
        return NULL;
    if (PyTuple_GET_SIZE(before) != FFG_NSIGNALS) {
        PyErr_SetString(PyExc_ValueError, "not a handlers() tuple");
        return NULL;
    }
    uintptr_t was[FFG_NSIGNALS];
    for (int s = 0; s < FFG_NSIGNALS; s++) {
        was[s] = (uintptr_t)PyLong_AsSize_t(PyTuple_GET_ITEM(before, s));
        if (was[s] == (uintptr_t)-1 && PyErr_Occurred())
            return NULL;
    }
    pthread_mutex_lock(&ffg_handlers_lock); /* pure C under it: the GIL can stay */
    int moved = ffg_handlers_after_faulthandler(was, enabled);
    pthread_mutex_unlock(&ffg_handlers_lock);
    return PyLong_FromLong(moved);
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

static PyObject *ffg_m_dladdr(PyObject *mod, PyObject *arg)
{
    (void)mod;
    uintptr_t pc = (uintptr_t)PyLong_AsVoidPtr(arg);
    if (PyErr_Occurred())
        return NULL;
    return ffg_describe(pc);
}

static PyObject *ffg_m_unwind_available(PyObject *mod, PyObject *noargs)
{
    (void)mod, (void)noargs;
    return PyBool_FromLong(ffg_unwind_available());
}

static PyObject *ffg_m_unwind_escapes(PyObject *mod, PyObject *noargs)
{
    (void)mod, (void)noargs;
    return PyLong_FromUnsignedLongLong(ffg_unwind_escapes());
}

static PyObject *ffg_m_set_unwind_available(PyObject *mod, PyObject *arg)
{
    (void)mod;
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    ffg_unwind_set_available(on);
    Py_RETURN_NONE;
}

/* ffiguard's Python layer sets its exception factory in the core, which is one per
 * process: a sub-interpreter importing ffiguard would replace the main interpreter's
 * with one of its own objects (and leave it dangling when it is destroyed). */
static int ffg_refuse_subinterpreter(void)
{
    if (PyInterpreterState_Get() == PyInterpreterState_Main())
        return 0;
    PyErr_SetString(PyExc_ImportError, "ffiguard works in the main interpreter only, not in a "
                    "sub-interpreter (its signal handlers and fault records are per process)");
    return -1;
}

static PyObject *ffg_m_set_fault_factory(PyObject *mod, PyObject *arg)
{
    (void)mod;
    if (ffg_refuse_subinterpreter() < 0)
        return NULL;
    Py_XSETREF(ffg_fault_factory, Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyObject *ffg_m_set_fault_types(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *classes, *stack_overflow, *fallback, *after_fault, *faults_globals;
    if (ffg_refuse_subinterpreter() < 0)
        return NULL;
    if (!PyArg_ParseTuple(args, "OOOOO:set_fault_types", &classes, &stack_overflow, &fallback, &after_fault,
                          &faults_globals))
        return NULL;
    if (ffg_set_fault_types(classes, stack_overflow, fallback, after_fault, faults_globals) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *ffg_m_set_quarantine_error(PyObject *mod, PyObject *arg)
{
    (void)mod;
    if (ffg_refuse_subinterpreter() < 0)
        return NULL;
    Py_XSETREF(ffg_quarantine_error, Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyObject *ffg_m_note_mask(PyObject *mod, PyObject *unused)
{
    (void)mod, (void)unused;
    if (ffg_note_mask() != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *ffg_m_pending(PyObject *mod, PyObject *unused)
{
    (void)mod, (void)unused;
    struct ffg_thread *t = ffg_tls;
    return PyLong_FromUnsignedLong(t ? __atomic_load_n(&t->npending, __ATOMIC_RELAXED) : 0);
}

static PyObject *ffg_m_depth(PyObject *mod, PyObject *unused)
{
    (void)mod, (void)unused;
    struct ffg_thread *t = ffg_tls;
    return PyLong_FromSsize_t(t ? t->top - (t->frames + 1) : 0);
}

static PyMethodDef ffg_methods[] = {
    {"note_mask", ffg_m_note_mask, METH_NOARGS,
     "the calling thread's signal mask is now the one its guarded calls start with"},
    {"pending", ffg_m_pending, METH_NOARGS, "faults recorded on this thread and not yet raised"},
    {"depth", ffg_m_depth, METH_NOARGS, "guard frames on this thread (live or finished out of order)"},

    {"set_quarantine_error", ffg_m_set_quarantine_error, METH_O, "set the LibraryQuarantined class"},
    {"stub", ffg_m_stub, METH_O, "stub(target) -> address of a new guard stub calling target"},
    {"stub_target", ffg_m_stub_target, METH_O, "stub_target(address) -> target, or None if not a stub"},
    /* compiled cffi modules (issue 15): cffi_api.inc */
    {"cffi_target", ffg_m_cffi_target, METH_O, "cffi_target(builtin) -> its C function's address, or None"},
    {"cffi_guard", ffg_m_cffi_guard, METH_VARARGS,
     "cffi_guard(builtin, name, policy, stub, got_target=None, shield=True) -> GuardedFunction calling the builtin's C function guarded"},
    {"cffi_patch", ffg_m_cffi_patch, METH_VARARGS,
     "cffi_patch(guarded, on=True): guard its builtin in place (on=False: put it back)"},
    {"cffi_patched", ffg_m_cffi_patched, METH_O, "cffi_patched(builtin) -> its GuardedFunction if guarded in place"},
    {"got_slots", ffg_m_got_slots, METH_O,
     "got_slots(address) -> {symbol: [(slot, value)]}: function GOT slots of the object holding address"},
    {"got_write", ffg_m_got_write, METH_VARARGS,
     "got_write(slot, expected, new) -> whether the slot held expected and now holds new"},
    {"install", ffg_m_install, METH_O, "install(signals): trap these signals"},
    {"untrap", ffg_m_untrap, METH_O, "untrap(signal): stop trapping it, put back what was there before"},
    {"refresh", ffg_m_refresh, METH_NOARGS,
     "put our handlers back where they were taken out for SIG_DFL/SIG_IGN; returns how many"},
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
    {"handlers", ffg_m_handlers, METH_NOARGS, "the handler installed for each signal now (addresses)"},
    {"after_faulthandler", ffg_m_after_faulthandler, METH_VARARGS,
     "after_faulthandler(handlers_before, enabled): follow faulthandler.enable()/disable()"},
    {"dladdr", ffg_m_dladdr, METH_O, "dladdr(pc) -> (path, base, symbol, symbol_address) or None"},
    {"unwind_available", ffg_m_unwind_available, METH_NOARGS,
     "whether fault backtraces go beyond the pc (glibc >= 2.35: _dl_find_object)"},
    {"unwind_escapes", ffg_m_unwind_escapes, METH_NOARGS,
     "faults inside the backtrace unwinder so far, escaped with what was collected (none expected)"},
    {"_set_unwind_available", ffg_m_set_unwind_available, METH_O,
     "_set_unwind_available(flag): tests only; False behaves as without _dl_find_object"},
    {"set_fault_factory", ffg_m_set_fault_factory, METH_O, "set the record -> exception callable"},
    {"set_fault_types", ffg_m_set_fault_types, METH_VARARGS,
     "set_fault_types(classes by signal number, stack overflow class, fallback class, after_fault, "
     "faults' globals): the exception is then made in C, as faults.from_record would (from_record "
     "itself for a SIGSEGV while globals['shield_classify'] is set)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef ffg_module = {
    PyModuleDef_HEAD_INIT, "ffiguard._core", "ffiguard's C core: stubs, thunk, fault handlers.",
    -1, ffg_methods, NULL, NULL, NULL, NULL,
};

/* A tuple of the first n names of an array. */
static PyObject *ffg_name_tuple(const char *const *names, Py_ssize_t n)
{
    PyObject *t = PyTuple_New(n);
    for (Py_ssize_t i = 0; t && i < n; i++) {
        PyObject *name = PyUnicode_FromString(names[i]);
        if (!name) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, i, name);
    }
    return t;
}

/* Entries of a NULL-terminated name array, without the NULL (which keeps an
 * architecture's empty list a valid array). */
#define FFG_NAMES_IN(array) ((Py_ssize_t)(sizeof(array) / sizeof((array)[0])) - 1)

PyMODINIT_FUNC PyInit__core(void)
{
    if (PyType_Ready(&ffg_GuardedFunction_Type) < 0 || PyType_Ready(&ffg_Policy_Type) < 0)
        return NULL;
    ffg_quarantine_error = Py_NewRef(PyExc_RuntimeError); /* until ffiguard sets its own */
    if (ffg_state_init() != 0)
        return PyErr_SetFromErrno(PyExc_OSError);

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
        PyModule_AddIntConstant(m, "MAX_FRAMES", FFG_MAX_FRAMES) < 0 ||
        PyModule_AddObject(m, "HANDLER", PyLong_FromSize_t((size_t)(uintptr_t)&ffg_on_signal)) < 0 ||
        PyModule_AddIntConstant(m, "MAX_PENDING", FFG_MAX_PENDING) < 0 ||
#ifdef FFG_NO_ARCH
        PyModule_AddIntConstant(m, "SUPPORTED", 0) < 0 ||
#else
        PyModule_AddIntConstant(m, "SUPPORTED", 1) < 0 ||
#endif
        PyModule_AddFunctions(m, ffg_shield_methods) < 0 || /* shield (issue 13) */
        PyModule_AddFunctions(m, ffg_intr_methods) < 0 || /* interrupt (issue 16) */
        PyModule_AddObject(m, "REGISTER_NAMES", ffg_name_tuple(ffg_register_names, FFG_NREGS)) < 0 ||
        PyModule_AddObject(m, "TRAP_REGISTERS", ffg_name_tuple(ffg_trap_register_names, FFG_NAMES_IN(ffg_trap_register_names))) < 0 ||
        PyModule_AddObject(m, "PAGE_FAULT_REGISTERS",
                           ffg_name_tuple(ffg_page_fault_register_names,
                                          FFG_NAMES_IN(ffg_page_fault_register_names))) < 0 ||
        PyModule_AddStringConstant(m, "TRAPNO_REGISTER", FFG_TRAPNO_REG) < 0 ||
        PyModule_AddIntConstant(m, "TRAP_PAGE_FAULT", FFG_TRAP_PAGE_FAULT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

