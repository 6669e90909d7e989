/* The host's fast path: FunctionBase, IsolatedFunction's C base, whose tp_call packs
 * number arguments straight into a free slot of its helper, exchanges and unpacks the
 * result; Slot and HelperBase, the Python objects it reads them from.  Anything unusual
 * goes to the Python path (set_hooks). */
#include "isolate.h"

#include <structmember.h>

#include <math.h>
#include <string.h>

/* Host: one argument into the packed request.  1: packed; 0: not for the fast path
 * (the Python path converts it, with ctypes' rules and errors).  Never sets an error. */
static int pack_arg(int code, int strict, PyObject *a, unsigned char *dst)
{
    if (code == 'P') {
        if (a == Py_None) {
            memset(dst, 0, 8);
            return 1;
        }
        if (!PyLong_CheckExact(a))
            return 0;
    } else if (strict ? !PyLong_CheckExact(a) : 0) {
        return 0;
    }
    switch (code) {
    case 'f': case 'd': {
        double v;
        if (PyFloat_Check(a))
            v = PyFloat_AS_DOUBLE(a);
        else if (PyLong_Check(a)) {
            v = PyLong_AsDouble(a);
            if (v == -1.0 && PyErr_Occurred()) {
                PyErr_Clear();
                return 0;
            }
        } else
            return 0;
        if (code == 'd') {
            memcpy(dst, &v, 8);
        } else {
            if (isfinite(v) && (v > 3.4028234663852886e38 || v < -3.4028234663852886e38))
                return 0; /* struct raises OverflowError: let the Python path do it */
            float f = (float)v;
            memcpy(dst, &f, 4);
        }
        return 1;
    }
    case '?':
        if (!PyLong_CheckExact(a) && !PyBool_Check(a)) /* (no __bool__ of a subclass) */
            return 0;
        *dst = (unsigned char)PyObject_IsTrue(a);
        return 1;
    case 'c':
        if (!PyBytes_Check(a) || PyBytes_GET_SIZE(a) != 1)
            return 0;
        *dst = (unsigned char)PyBytes_AS_STRING(a)[0];
        return 1;
    default:
        break;
    }
    if (!PyLong_Check(a))
        return 0;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(a, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    unsigned long long u = (unsigned long long)v;
    if (overflow > 0 && (code == 'L' || code == 'Q')) {
        u = PyLong_AsUnsignedLongLong(a);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
    } else if (overflow) {
        return 0;
    }
    /* In range, or the Python path decides (it truncates the way ctypes does). */
    switch (code) {
    case 'b': if (v < -128 || v > 127) return 0; { int8_t x = (int8_t)v; memcpy(dst, &x, 1); } return 1;
    case 'B': if (v < 0 || v > 255) return 0; *dst = (unsigned char)v; return 1;
    case 'h': if (v < -32768 || v > 32767) return 0; { int16_t x = (int16_t)v; memcpy(dst, &x, 2); } return 1;
    case 'H': if (v < 0 || v > 65535) return 0; { uint16_t x = (uint16_t)v; memcpy(dst, &x, 2); } return 1;
    case 'i': if (v < INT32_MIN || v > INT32_MAX) return 0; { int32_t x = (int32_t)v; memcpy(dst, &x, 4); } return 1;
    case 'I': if (v < 0 || v > (long long)UINT32_MAX) return 0; { uint32_t x = (uint32_t)v; memcpy(dst, &x, 4); } return 1;
    case 'l': case 'q': case 'P':
        if (overflow || (code == 'P' && v < 0)) /* negative "pointers" mean slot offsets */
            return 0;
        memcpy(dst, &v, 8);
        return 1;
    case 'L': case 'Q':
        if (!overflow && v < 0)
            return 0;
        memcpy(dst, &u, 8);
        return 1;
    default:
        return 0;
    }
}

/* ---- Slot: one call slot, as the host's Python code sees it ---- */

/* Python objects, as __slots__ would hold them (Python reads them on every call of the
 * general path: no int object is made per access); the fast path converts `addr`. */
typedef struct {
    PyObject_HEAD
    PyObject *addr;            /* int: the slot header in this process */
    PyObject *index, *base, *payload, *limit, *cb_off; /* ints */
    PyObject *mem;             /* memoryview of the whole control region */
} SlotObject;

static PyMemberDef slot_members[] = {
    {"addr", T_OBJECT_EX, offsetof(SlotObject, addr), 0, NULL},
    {"index", T_OBJECT_EX, offsetof(SlotObject, index), 0, NULL},
    {"base", T_OBJECT_EX, offsetof(SlotObject, base), 0, NULL},
    {"payload", T_OBJECT_EX, offsetof(SlotObject, payload), 0, NULL},
    {"limit", T_OBJECT_EX, offsetof(SlotObject, limit), 0, NULL},
    {"cb_off", T_OBJECT_EX, offsetof(SlotObject, cb_off), 0, NULL},
    {"mem", T_OBJECT_EX, offsetof(SlotObject, mem), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static void slot_dealloc(SlotObject *self)
{
    Py_CLEAR(self->addr);
    Py_CLEAR(self->index);
    Py_CLEAR(self->base);
    Py_CLEAR(self->payload);
    Py_CLEAR(self->limit);
    Py_CLEAR(self->cb_off);
    Py_CLEAR(self->mem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyTypeObject Slot_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ffiguard._isolate.Slot",
    .tp_doc = "A call slot of a helper's control region (host side).",
    .tp_basicsize = sizeof(SlotObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)slot_dealloc,
    .tp_members = slot_members,
};

/* ---- HelperBase: what the host's fast path reads of a helper (_Helper's C base) ---- */

/* Objects, read with T_OBJECT_EX members: CPython 3.11 specializes attribute access
 * for those (as for __slots__), not for T_BOOL or T_INT ones. */
typedef struct {
    PyObject_HEAD
    PyObject *dead, *retired; /* bools */
    PyObject *waiters;        /* int */
    PyObject *pid;    /* int (an object: Python reads it on every call) */
    PyObject *free;   /* list of free Slot objects */
} HelperObject;

static PyMemberDef helper_members[] = {
    {"dead", T_OBJECT_EX, offsetof(HelperObject, dead), 0, NULL},
    {"retired", T_OBJECT_EX, offsetof(HelperObject, retired), 0, NULL},
    {"waiters", T_OBJECT_EX, offsetof(HelperObject, waiters), 0, NULL},
    {"pid", T_OBJECT_EX, offsetof(HelperObject, pid), 0, NULL},
    {"free", T_OBJECT_EX, offsetof(HelperObject, free), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static int helper_traverse(HelperObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->free);
    Py_VISIT(self->pid);
    Py_VISIT(self->dead);
    Py_VISIT(self->retired);
    Py_VISIT(self->waiters);
    return 0;
}

static int helper_clear(HelperObject *self)
{
    Py_CLEAR(self->free);
    Py_CLEAR(self->pid);
    Py_CLEAR(self->dead);
    Py_CLEAR(self->retired);
    Py_CLEAR(self->waiters);
    return 0;
}

static void helper_dealloc(HelperObject *self)
{
    PyObject_GC_UnTrack(self);
    helper_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *helper_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    (void)args, (void)kw;
    HelperObject *self = (HelperObject *)type->tp_alloc(type, 0);
    if (self) {
        self->dead = Py_NewRef(Py_False);
        self->retired = Py_NewRef(Py_False);
        self->waiters = PyLong_FromLong(0);
        if (!self->waiters)
            Py_CLEAR(self);
    }
    return (PyObject *)self;
}

/* Is this helper taking fast calls?  (Anything but False: the Python path decides.) */
static inline int helper_usable(HelperObject *h)
{
    return h->dead == Py_False && h->retired == Py_False;
}

static inline int helper_waited_on(HelperObject *h)
{
    return h->retired != Py_False || !h->waiters || !PyLong_CheckExact(h->waiters) ||
           PyObject_IsTrue(h->waiters);
}

PyTypeObject Helper_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ffiguard._isolate.HelperBase",
    .tp_doc = "The state of a helper process that the host's fast path reads.",
    .tp_basicsize = sizeof(HelperObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = helper_new,
    .tp_dealloc = (destructor)helper_dealloc,
    .tp_traverse = (traverseproc)helper_traverse,
    .tp_clear = (inquiry)helper_clear,
    .tp_members = helper_members,
};

/* ---- Function: IsolatedFunction's C base; its tp_call is the host's fast path ---- */

static PyObject *slow_call;   /* IsolatedFunction._call(self, *args) */
static PyObject *fast_fail;   /* _fast_fail(function, helper, slot, state, args, req_len) */
static PyObject *str_release;

typedef struct {
    PyObject_HEAD
    PyObject *timeout;        /* None: the library's */
    PyObject *errcheck;
    HelperObject *helper;     /* bound: the helper that knows fid (NULL: no fast path) */
    uint32_t fid;
    double lib_timeout;       /* seconds, 0: none */
    fastdesc desc;
} FunctionObject;

static PyMemberDef function_members[] = {
    {"timeout", T_OBJECT_EX, offsetof(FunctionObject, timeout), 0, NULL},
    {"errcheck", T_OBJECT_EX, offsetof(FunctionObject, errcheck), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static int function_traverse(FunctionObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->timeout);
    Py_VISIT(self->errcheck);
    Py_VISIT(self->helper);
    return 0;
}

static int function_clear(FunctionObject *self)
{
    Py_CLEAR(self->timeout);
    Py_CLEAR(self->errcheck);
    Py_CLEAR(self->helper);
    return 0;
}

static void function_dealloc(FunctionObject *self)
{
    PyObject_GC_UnTrack(self);
    function_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* _bind_fast(helper, fid, descriptor, library_timeout) */
static PyObject *function_bind(FunctionObject *self, PyObject *args)
{
    PyObject *helper, *desc;
    unsigned int fid;
    double lt;
    fastdesc d;
    if (!PyArg_ParseTuple(args, "O!IOd:_bind_fast", &Helper_Type, &helper, &fid, &desc, &lt))
        return NULL;
    if (fid & ADMIN_BIT) {
        PyErr_SetString(PyExc_ValueError, "bad function id");
        return NULL;
    }
    if (parse_desc(desc, &d, 4096) < 0) /* every slot has more than 4 KiB of payload */
        return NULL;
    self->desc = d;
    self->fid = fid;
    self->lib_timeout = lt;
    Py_INCREF(helper);
    Py_XSETREF(self->helper, (HelperObject *)helper);
    Py_RETURN_NONE;
}

static PyObject *function_unbind(FunctionObject *self, PyObject *noargs)
{
    (void)noargs;
    Py_CLEAR(self->helper);
    Py_RETURN_NONE;
}

static PyObject *function_fast_bound(FunctionObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->helper != NULL);
}

static PyObject *call_slow(PyObject *self, PyObject *args, PyObject *kw)
{
    if (!slow_call) {
        PyErr_SetString(PyExc_SystemError, "ffiguard isolate: no call hook");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (!kw && n < 16) {
        PyObject *stack[17];
        stack[0] = self;
        for (Py_ssize_t i = 0; i < n; i++)
            stack[i + 1] = PyTuple_GET_ITEM(args, i);
        return PyObject_Vectorcall(slow_call, stack, (size_t)n + 1, NULL);
    }
    PyObject *all = PyTuple_New(n + 1);
    if (!all)
        return NULL;
    PyTuple_SET_ITEM(all, 0, Py_NewRef(self));
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(all, i + 1, Py_NewRef(PyTuple_GET_ITEM(args, i)));
    PyObject *r = PyObject_Call(slow_call, all, kw);
    Py_DECREF(all);
    return r;
}

static PyObject *function_call(PyObject *op, PyObject *args, PyObject *kw)
{
    FunctionObject *self = (FunctionObject *)op;
    HelperObject *h = self->helper;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (!h || (kw && PyDict_GET_SIZE(kw)) || n != self->desc.nargs || !helper_usable(h))
        return call_slow(op, args, kw);
    /* Copies: another thread may rebind this function while the GIL is released. */
    const fastdesc dcopy = self->desc, *d = &dcopy;
    const uint32_t fid = self->fid;

    /* The arguments, before taking a slot: anything unusual goes the Python way. */
    union { unsigned char b[256]; uint64_t align; } req;
    memset(req.b, 0, d->argsize);
    int strict = d->flags & FD_STRICT;
    for (Py_ssize_t k = 0; k < n; k++)
        if (!pack_arg(d->code[k], strict, PyTuple_GET_ITEM(args, k), req.b + d->off[k]))
            return call_slow(op, args, kw);
    double timeout = self->lib_timeout;
    if (self->timeout && self->timeout != Py_None) {
        if (!PyFloat_CheckExact(self->timeout) && !PyLong_CheckExact(self->timeout))
            return call_slow(op, args, kw);
        timeout = PyFloat_AsDouble(self->timeout);
        if (timeout == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return call_slow(op, args, kw);
        }
    }
    long long deadline = 0;
    if (timeout != 0.0) {
        if (!(timeout > 0 && timeout < 1e9))
            return call_slow(op, args, kw);
        deadline = now_ns() + (long long)(timeout * 1e9);
    }
    PyObject *freelist = h->free;
    Py_ssize_t nfree;
    if (!freelist || !PyList_CheckExact(freelist) || (nfree = PyList_GET_SIZE(freelist)) == 0 ||
        !PyObject_TypeCheck(PyList_GET_ITEM(freelist, nfree - 1), &Slot_Type) ||
        !h->pid || !PyLong_CheckExact(h->pid))
        return call_slow(op, args, kw);
    PyObject *addr_obj = ((SlotObject *)PyList_GET_ITEM(freelist, nfree - 1))->addr;
    if (!addr_obj || !PyLong_CheckExact(addr_obj))
        return call_slow(op, args, kw);
    uintptr_t slot_addr = (uintptr_t)PyLong_AsUnsignedLongLong(addr_obj);
    long pid = PyLong_AsLong(h->pid);
    if (PyErr_Occurred() || !slot_addr || (slot_addr & 63)) {
        PyErr_Clear();
        return call_slow(op, args, kw);
    }
    Py_INCREF(h);
    SlotObject *slot = (SlotObject *)Py_NewRef(PyList_GET_ITEM(freelist, nfree - 1));
    PyObject *result = NULL;
    if (PyList_SetSlice(freelist, nfree - 1, nfree, NULL) < 0) {
        Py_DECREF(slot);
        Py_DECREF(h);
        return NULL;
    }

    unsigned char *base = (unsigned char *)slot_addr;
    unsigned char *payload = base + SLOT_HEAD;
    memcpy(payload, req.b, d->argsize);
    uint32_t head[3] = {fid, 0, d->argsize};
    memcpy(base + OFF_OP, head, sizeof head);
    int rc = run_exchange((slot_head *)base, ST_CALL, ST_CALL, deadline, (pid_t)pid);
    if (rc == ST_REPLY) {
        uint32_t status;
        memcpy(&status, base + OFF_STATUS, 4);
        if (status == 0) { /* OK; the result is where this side says, inside the slot */
            result = d->rescode ? unpack_value(d->rescode, payload + align16(d->argsize))
                                : Py_NewRef(Py_None);
            if (!result)
                goto fail_hook;
            int r;
            PyObject *freelist = h->free; /* (re-read: the GIL was released) */
            if (helper_waited_on(h) || !freelist || !PyList_CheckExact(freelist)) {
                /* someone waits for a slot (or retired the helper): Python's release */
                PyObject *x = PyObject_CallMethodObjArgs((PyObject *)h, str_release, (PyObject *)slot, NULL);
                r = x ? 0 : -1;
                Py_XDECREF(x);
            } else {
                r = PyList_Append(freelist, (PyObject *)slot);
            }
            if (r < 0)
                Py_CLEAR(result);
            Py_DECREF(slot);
            Py_DECREF(h);
            if (result && self->errcheck && self->errcheck != Py_None) {
                PyObject *checked = PyObject_CallFunctionObjArgs(self->errcheck, result, op, args, NULL);
                Py_DECREF(result);
                return checked;
            }
            return result;
        }
    }
fail_hook: {
        /* Not a plain success: the Python side makes the exception (and releases). */
        PyObject *exc_type = NULL, *exc_val = NULL, *exc_tb = NULL;
        PyObject *state;
        if (rc == RC_PYERR) {
            PyErr_Fetch(&exc_type, &exc_val, &exc_tb);
            state = Py_NewRef(Py_None);
        } else {
            if (PyErr_Occurred())
                PyErr_Fetch(&exc_type, &exc_val, &exc_tb);
            state = PyLong_FromLong(rc);
        }
        PyObject *size = PyLong_FromLong(d->argsize);
        PyObject *r = state && size && fast_fail
                          ? PyObject_CallFunctionObjArgs(fast_fail, op, (PyObject *)h, (PyObject *)slot,
                                                         state, args, size, NULL)
                          : NULL;
        Py_XDECREF(state);
        Py_XDECREF(size);
        Py_DECREF(slot);
        Py_DECREF(h);
        if (exc_type) { /* Ctrl-C (or a failed result conversion): that exception wins */
            Py_XDECREF(r);
            PyErr_Restore(exc_type, exc_val, exc_tb);
            return NULL;
        }
        return r;
    }
}

static PyMethodDef function_methods[] = {
    {"_bind_fast", (PyCFunction)function_bind, METH_VARARGS,
     "_bind_fast(helper, fid, descriptor, library_timeout): calls with these numbers take the C path"},
    {"_unbind_fast", (PyCFunction)function_unbind, METH_NOARGS, "forget the fast path"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef function_getset[] = {
    {"_fast_bound", (getter)function_fast_bound, NULL, "whether calls may take the C path", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject *function_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    (void)args, (void)kw;
    FunctionObject *self = (FunctionObject *)type->tp_alloc(type, 0);
    if (self) {
        self->timeout = Py_NewRef(Py_None);
        self->errcheck = Py_NewRef(Py_None);
    }
    return (PyObject *)self;
}

PyTypeObject Function_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ffiguard._isolate.FunctionBase",
    .tp_doc = "IsolatedFunction's C base: the fast path for calls with number arguments.",
    .tp_basicsize = sizeof(FunctionObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = function_new,
    .tp_dealloc = (destructor)function_dealloc,
    .tp_traverse = (traverseproc)function_traverse,
    .tp_clear = (inquiry)function_clear,
    .tp_call = function_call,
    .tp_members = function_members,
    .tp_methods = function_methods,
    .tp_getset = function_getset,
};

PyObject *set_hooks(PyObject *self, PyObject *args)
{
    PyObject *slow, *fail;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO:set_hooks", &slow, &fail))
        return NULL;
    Py_INCREF(slow);
    Py_INCREF(fail);
    Py_XSETREF(slow_call, slow);
    Py_XSETREF(fast_fail, fail);
    Py_RETURN_NONE;
}

int host_fast_ready(void)
{
    if (PyType_Ready(&Slot_Type) < 0 || PyType_Ready(&Helper_Type) < 0 ||
        PyType_Ready(&Function_Type) < 0)
        return -1;
    if (!str_release && !(str_release = PyUnicode_InternFromString("release")))
        return -1;
    return 0;
}
