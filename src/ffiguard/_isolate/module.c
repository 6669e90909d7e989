/* ffiguard._isolate: the method table and PyInit; the code is in the files isolate.h lists. */
#include "isolate.h"

static PyMethodDef methods[] = {
    {"exchange", (PyCFunction)(void (*)(void))exchange, METH_FASTCALL,
     "exchange(slot, set_state, wait_while, deadline_ns=0, pid=0) -> state"},
    {"configure", configure, METH_VARARGS, "configure(side, spin_ns, spin_limit, slice_ns)"},
    {"counters", counters, METH_NOARGS, "spin hits, futex sleeps and wakes in this process"},
    {"map_shared", map_shared, METH_VARARGS, "map_shared(fd, size, address=0) -> address"},
    {"unmap", unmap, METH_VARARGS, "unmap(address, size)"},
    {"set_hooks", set_hooks, METH_VARARGS, "set_hooks(slow_call, fast_fail): the host's Python paths"},
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL,
     "serve(slot_address, set_state, wait_while, table, limit) -> state (the helper's fast loop)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ffiguard._isolate",
    "Shared-memory call slots for ffiguard's isolate mode (futex + bounded spinning).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__isolate(void)
{
    if (host_fast_ready() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddObject(m, "Slot", Py_NewRef((PyObject *)&Slot_Type)) ||
              PyModule_AddObject(m, "HelperBase", Py_NewRef((PyObject *)&Helper_Type)) ||
              PyModule_AddObject(m, "FunctionBase", Py_NewRef((PyObject *)&Function_Type)) ||
              PyModule_AddIntConstant(m, "FAST_MAXARGS", FAST_MAXARGS) ||
              PyModule_AddIntConstant(m, "TIMEOUT", RC_TIMEOUT) ||
              PyModule_AddIntConstant(m, "DEAD", RC_DEAD) ||
              PyModule_AddIntConstant(m, "PROTOCOL", RC_PROTOCOL) ||
              PyModule_AddIntConstant(m, "MAX_LEASES", MAX_LEASES))) {
        Py_DECREF(m);
        return NULL;
    }
#ifdef Py_GIL_DISABLED
    /* Correct without the GIL: the slot pool and the fast path's binding change in
     * critical sections, the transport's settings are atomics (isolate.h). */
    if (m && PyUnstable_Module_SetGIL(m, Py_MOD_GIL_NOT_USED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#endif
    return m;
}
