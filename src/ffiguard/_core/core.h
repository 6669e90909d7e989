/* What the C files behind the Python objects share: the two types, the objects set
 * at import, and small compatibility helpers. Normal context only (Python API). */
#ifndef FFG_CORE_H
#define FFG_CORE_H

#define PY_SSIZE_T_CLEAN
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <Python.h>

#include "state.h"

/* What happens to a library's functions after one of them faulted: shared by all the
 * functions of a library, tested on every call (one load and a branch). */
typedef struct {
    PyObject_HEAD
    int quarantined; /* further calls raise LibraryQuarantined until released */
    PyObject *on_fault; /* "raise", "quarantine" or "exit": read by the Python layer */
    PyObject *name;     /* the library's name, for messages */
} ffg_Policy;

/* policy.c */
extern PyTypeObject ffg_Policy_Type;
extern PyObject *ffg_quarantine_error; /* ffiguard.LibraryQuarantined, set at import */

/* guarded.c */
extern PyTypeObject ffg_GuardedFunction_Type;
extern PyObject *ffg_fault_factory; /* ffiguard.faults.from_record, set at import */
int ffg_set_fault_types(PyObject *classes, PyObject *stack_overflow, PyObject *fallback, PyObject *after_fault,
                        PyObject *faults_globals);
extern const char *const ffg_access_names[];
PyObject *ffg_describe(uintptr_t pc); /* (path, base, symbol, symbol address) or None */
/* guarded.c, cffi_api.inc: compiled cffi modules (issue 15), module functions */
PyObject *ffg_m_cffi_target(PyObject *mod, PyObject *builtin);
PyObject *ffg_m_cffi_guard(PyObject *mod, PyObject *args);
PyObject *ffg_m_cffi_patch(PyObject *mod, PyObject *args);
PyObject *ffg_m_cffi_patched(PyObject *mod, PyObject *builtin);
/* got.c (issue 15) */
PyObject *ffg_m_got_slots(PyObject *mod, PyObject *address);
PyObject *ffg_m_got_write(PyObject *mod, PyObject *args);

/* interrupt.c (issue 16): stopping a hung call. Normal context. */
#define FFG_NS_PER_S 1000000000.0
struct ffg_intr_saved { /* the enclosing call's, put back when a nested one ends */
    uint64_t sigint_token, timer_token;
    int64_t deadline;
};
int ffg_intr_timeout_ns(PyObject *timeout, int64_t *ns); /* None/NULL -> 0; -1 + exception */
int ffg_intr_begin(struct ffg_thread *t, uint64_t token, int interruptible, int64_t timeout_ns,
                   struct ffg_intr_saved *saved); /* -1 + exception */
void ffg_intr_end(struct ffg_thread *t, uint64_t token, const struct ffg_intr_saved *saved);
int ffg_intr_is_stop(int signo);
PyObject *ffg_intr_exception(PyObject *record, PyObject *name, PyObject *call_args, PyObject *kwnames,
                             PyObject *policy, int64_t timeout_ns);
extern PyMethodDef ffg_intr_methods[];

#endif
