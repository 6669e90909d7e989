/* The host's fast path: FunctionBase, IsolatedFunction's C base, whose tp_call packs
 * number arguments straight into a free slot of its helper, exchanges and unpacks the
 * result; Slot and HelperBase, the Python objects it reads them from.  Anything unusual
 * goes to the Python path (set_hooks). */
#include "isolate.h"

#include <structmember.h>

#include <math.h>
#include <string.h>
#include <sys/mman.h>

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
 * general path: no int object is made per access); the address is a C field (the fast
 * path and exchange() read it), shown to Python as `addr`.  A slot belongs to the one
 * thread that took it from its helper's pool until that thread gives it back, so its
 * C fields need no lock: the pool's lock orders one owner after the next. */
typedef struct {
    PyObject_HEAD
    uintptr_t caddr;           /* the slot header in this process (0: not set yet) */
    _Atomic int *counted;      /* the in-flight counter its call incremented, or NULL */
    Py_ssize_t pool_index;     /* its place in its helper's pool (set by _set_slots) */
    int in_pool;               /* free in the pool (changed in the pool's critical section) */
    PyObject *index, *base, *payload, *limit, *cb_off; /* ints */
    PyObject *mem;             /* memoryview of the whole control region */
} SlotObject;

/* Slot headers are 64-byte aligned (the state word and flags share one cache line). */
#define FFG_SLOT_ALIGN 64

static PyMemberDef slot_members[] = {
    {"index", T_OBJECT_EX, offsetof(SlotObject, index), 0, NULL},
    {"base", T_OBJECT_EX, offsetof(SlotObject, base), 0, NULL},
    {"payload", T_OBJECT_EX, offsetof(SlotObject, payload), 0, NULL},
    {"limit", T_OBJECT_EX, offsetof(SlotObject, limit), 0, NULL},
    {"cb_off", T_OBJECT_EX, offsetof(SlotObject, cb_off), 0, NULL},
    {"mem", T_OBJECT_EX, offsetof(SlotObject, mem), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *slot_get_addr(SlotObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong((unsigned long long)self->caddr);
}

static int slot_set_addr(SlotObject *self, PyObject *v, void *closure)
{
    (void)closure;
    if (!v || !PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "a slot's addr is an int");
        return -1;
    }
    unsigned long long a = PyLong_AsUnsignedLongLong(v);
    if (a == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (!a || a % FFG_SLOT_ALIGN) {
        PyErr_SetString(PyExc_ValueError, "a slot's addr must be non-zero and 64-byte aligned");
        return -1;
    }
    self->caddr = (uintptr_t)a;
    return 0;
}

static PyGetSetDef slot_getset[] = {
    {"addr", (getter)slot_get_addr, (setter)slot_set_addr, "the slot header in this process", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject *slot_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    (void)args, (void)kw;
    SlotObject *self = (SlotObject *)type->tp_alloc(type, 0);
    if (self)
        self->pool_index = -1;
    return (PyObject *)self;
}

static void slot_dealloc(SlotObject *self)
{
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
    .tp_new = slot_new,
    .tp_dealloc = (destructor)slot_dealloc,
    .tp_members = slot_members,
    .tp_getset = slot_getset,
};

int ffg_slot_check(PyObject *o) { return PyObject_TypeCheck(o, &Slot_Type); }

uintptr_t ffg_slot_address(PyObject *o) { return ((SlotObject *)o)->caddr; }

uintptr_t ffg_slot_begin_call(PyObject *o)
{
    SlotObject *slot = (SlotObject *)o;
    if (!slot->counted && slot->caddr) {
        _Atomic int *c = ffg_inflight_counter();
        atomic_fetch_add(c, 1);
        slot->counted = c;
    }
    return slot->caddr;
}

static void ffg_slot_end_call(SlotObject *slot)
{
    if (slot->counted) {
        atomic_fetch_sub(slot->counted, 1);
        slot->counted = NULL;
    }
}

/* ---- HelperBase: a helper's slot pool, and what the fast path reads of it ---- */

/* dead, retired and pid are objects read with T_OBJECT_EX members: CPython 3.11
 * specializes attribute access for those (as for __slots__), not for T_BOOL or T_INT
 * ones, and the Python path reads them on every call.  C only compares dead and
 * retired with Py_False (no dereference).
 *
 * The pool: every slot (owned references in `all`) and a stack of the free ones, with
 * the count of threads waiting for one.  Every change happens inside a critical
 * section on the helper (a per-object lock in free-threaded builds, the GIL's
 * atomicity otherwise), which holds no Python call and no DECREF.  The control region
 * (the mapping every slot lies in) is unmapped exactly once: when the helper is dead
 * and every slot is back, after which the pool hands out nothing. */
typedef struct {
    PyObject_HEAD
    PyObject *dead, *retired; /* bools */
    PyObject *pid;            /* int */
    SlotObject **all, **stack;
    Py_ssize_t nslots, nfree;
    Py_ssize_t waiters;       /* threads waiting in Python for a free slot */
    int unmapped;             /* the region is gone: nothing is handed out any more */
    pid_t cpid;
    uintptr_t region;         /* the control region's mapping (0: none) */
    size_t region_size;
} HelperObject;

/* Flags of a slot given back (ffg_pool_give): what the Python side must do. */
enum { FFG_GIVE_WAKE = 1,   /* wake a thread waiting for a slot */
       FFG_GIVE_RETIRED = 2 /* the helper is retired: close it once every slot is back */ };

static PyMemberDef helper_members[] = {
    {"dead", T_OBJECT_EX, offsetof(HelperObject, dead), READONLY, NULL},       /* _set_dead() */
    {"retired", T_OBJECT_EX, offsetof(HelperObject, retired), READONLY, NULL}, /* _set_retired() */
    {"pid", T_OBJECT_EX, offsetof(HelperObject, pid), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static inline int ffg_is_false(PyObject **field)
{
    return __atomic_load_n(field, __ATOMIC_ACQUIRE) == Py_False;
}

/* The region to unmap now, or 0: inside the helper's critical section. */
static uintptr_t ffg_pool_unmap_due(HelperObject *h)
{
    if (h->unmapped || !h->region || h->nfree != h->nslots || ffg_is_false(&h->dead))
        return 0;
    h->unmapped = 1;
    return h->region;
}

static void ffg_unmap_region(uintptr_t region, size_t size)
{
    if (region)
        munmap((void *)region, size);
}

/* A free slot (a new reference), or NULL: none free, or the helper is dead or retired
 * (a call that looked before it was retired goes to the next helper instead of one
 * being closed), or the region is gone. */
static SlotObject *ffg_pool_take(HelperObject *h)
{
    SlotObject *slot = NULL;
    Py_BEGIN_CRITICAL_SECTION(h);
    if (!h->unmapped && h->nfree > 0 && ffg_is_false(&h->dead) && ffg_is_false(&h->retired)) {
        slot = h->stack[--h->nfree];
        slot->in_pool = 0;
        Py_INCREF(slot);
    }
    Py_END_CRITICAL_SECTION();
    return slot;
}

/* Give a slot back (the caller keeps its own reference): FFG_GIVE_* flags. */
static int ffg_pool_give(HelperObject *h, SlotObject *slot)
{
    int flags = 0;
    uintptr_t region = 0;
    ffg_slot_end_call(slot);
    Py_BEGIN_CRITICAL_SECTION(h);
    /* Only this pool's slots, each once. */
    Py_ssize_t i = slot->pool_index;
    if (i >= 0 && i < h->nslots && h->all[i] == slot && !slot->in_pool && h->nfree < h->nslots) {
        slot->in_pool = 1;
        h->stack[h->nfree++] = slot;
    }
    if (h->waiters)
        flags |= FFG_GIVE_WAKE;
    if (!ffg_is_false(&h->retired))
        flags |= FFG_GIVE_RETIRED;
    region = ffg_pool_unmap_due(h);
    Py_END_CRITICAL_SECTION();
    ffg_unmap_region(region, h->region_size);
    return flags;
}

static int helper_traverse(HelperObject *self, visitproc visit, void *arg)
{
    for (Py_ssize_t i = 0; i < self->nslots; i++)
        Py_VISIT(self->all[i]);
    Py_VISIT(self->pid);
    Py_VISIT(self->dead);
    Py_VISIT(self->retired);
    return 0;
}

static int helper_clear(HelperObject *self)
{
    Py_CLEAR(self->pid);
    Py_CLEAR(self->dead);
    Py_CLEAR(self->retired);
    return 0;
}

static void helper_dealloc(HelperObject *self)
{
    PyObject_GC_UnTrack(self);
    /* Nobody holds a slot any more (a slot's holder holds the helper): the region can go. */
    if (!self->unmapped) {
        self->unmapped = 1;
        ffg_unmap_region(self->region, self->region_size);
    }
    for (Py_ssize_t i = 0; i < self->nslots; i++)
        Py_CLEAR(self->all[i]);
    PyMem_Free(self->all);
    PyMem_Free(self->stack);
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
        self->pid = PyLong_FromLong(0);
        if (!self->pid)
            Py_CLEAR(self);
    }
    return (PyObject *)self;
}

/* _set_region(address, size): the control region, unmapped when the helper is dead
 * and every slot is back (or when the helper object goes).  Once. */
static PyObject *helper_set_region(HelperObject *self, PyObject *args)
{
    unsigned long long addr, size;
    if (!PyArg_ParseTuple(args, "KK:_set_region", &addr, &size))
        return NULL;
    int ok;
    Py_BEGIN_CRITICAL_SECTION(self);
    ok = !self->region && addr;
    if (ok) {
        self->region = (uintptr_t)addr;
        self->region_size = (size_t)size;
    }
    Py_END_CRITICAL_SECTION();
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "_set_region: once, with a mapping");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* _set_slots(slots, pid): the pool (every slot free; the first taken first).  Once. */
static PyObject *helper_set_slots(HelperObject *self, PyObject *args)
{
    PyObject *list;
    int pid;
    if (!PyArg_ParseTuple(args, "O!i:_set_slots", &PyList_Type, &list, &pid))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "_set_slots: no slots");
        return NULL;
    }
    SlotObject **all = PyMem_Calloc((size_t)n, sizeof *all);
    SlotObject **stack = PyMem_Calloc((size_t)n, sizeof *stack);
    if (!all || !stack)
        goto nomem;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PyList_GET_ITEM(list, i);
        if (!PyObject_TypeCheck(o, &Slot_Type) || !((SlotObject *)o)->caddr) {
            PyErr_SetString(PyExc_TypeError, "_set_slots: Slot objects with an address expected");
            goto fail;
        }
        all[i] = (SlotObject *)Py_NewRef(o);
        stack[n - 1 - i] = all[i];
    }
    int ok;
    Py_BEGIN_CRITICAL_SECTION(self);
    ok = !self->all;
    for (Py_ssize_t i = 0; ok && i < n; i++) /* (a slot belongs to one pool) */
        ok = !all[i]->in_pool && all[i]->pool_index < 0;
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        all[i]->pool_index = i;
        all[i]->in_pool = 1;
    }
    if (ok) {
        self->all = all;
        self->stack = stack;
        self->nslots = self->nfree = n;
        self->cpid = (pid_t)pid;
    }
    Py_END_CRITICAL_SECTION();
    if (ok)
        Py_RETURN_NONE;
    PyErr_SetString(PyExc_ValueError, "_set_slots: once, with slots of no other pool");
fail:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(all[i]);
    PyMem_Free(all);
    PyMem_Free(stack);
    return NULL;
nomem:
    PyMem_Free(all);
    PyMem_Free(stack);
    return PyErr_NoMemory();
}

/* Mark the helper dead (_set_dead) or retired (_set_retired) inside the pool's critical
 * section, so that no slot is taken after it: -> whether every slot is free. */
static PyObject *ffg_helper_mark(HelperObject *self, PyObject **field)
{
    PyObject *old;
    int all_free;
    Py_BEGIN_CRITICAL_SECTION(self);
    old = *field;
    __atomic_store_n(field, Py_NewRef(Py_True), __ATOMIC_RELEASE);
    all_free = self->nfree == self->nslots;
    Py_END_CRITICAL_SECTION();
    Py_XDECREF(old);
    return PyBool_FromLong(all_free);
}

static PyObject *helper_set_dead(HelperObject *self, PyObject *noargs)
{
    (void)noargs;
    return ffg_helper_mark(self, &self->dead);
}

static PyObject *helper_set_retired(HelperObject *self, PyObject *noargs)
{
    (void)noargs;
    return ffg_helper_mark(self, &self->retired);
}

static PyObject *helper_take(HelperObject *self, PyObject *noargs)
{
    (void)noargs;
    SlotObject *slot = ffg_pool_take(self);
    return slot ? (PyObject *)slot : Py_NewRef(Py_None);
}

/* _give(slot) -> flags: the slot is back in the pool (FFG_GIVE_WAKE: a thread waits for
 * one; FFG_GIVE_RETIRED: the helper is retired). */
static PyObject *helper_give(HelperObject *self, PyObject *slot)
{
    if (!PyObject_TypeCheck(slot, &Slot_Type)) {
        PyErr_SetString(PyExc_TypeError, "_give: a Slot expected");
        return NULL;
    }
    return PyLong_FromLong(ffg_pool_give(self, (SlotObject *)slot));
}

/* _waiting(delta): a thread starts (+1) or stops (-1) waiting for a slot. */
static PyObject *helper_waiting(HelperObject *self, PyObject *arg)
{
    long d = PyLong_AsLong(arg);
    if (d == -1 && PyErr_Occurred())
        return NULL;
    Py_BEGIN_CRITICAL_SECTION(self);
    self->waiters += d;
    Py_END_CRITICAL_SECTION();
    Py_RETURN_NONE;
}

/* _maybe_unmap() -> bool: after the helper was marked dead: unmap the region now if
 * every slot is back (otherwise the last slot given back does it). */
static PyObject *helper_maybe_unmap(HelperObject *self, PyObject *noargs)
{
    (void)noargs;
    uintptr_t region;
    Py_BEGIN_CRITICAL_SECTION(self);
    region = ffg_pool_unmap_due(self);
    Py_END_CRITICAL_SECTION();
    ffg_unmap_region(region, self->region_size);
    return PyBool_FromLong(region != 0);
}

static PyObject *helper_get_nfree(HelperObject *self, void *closure)
{
    (void)closure;
    Py_ssize_t n;
    Py_BEGIN_CRITICAL_SECTION(self);
    n = self->nfree;
    Py_END_CRITICAL_SECTION();
    return PyLong_FromSsize_t(n);
}

static PyObject *helper_get_unmapped(HelperObject *self, void *closure)
{
    (void)closure;
    int u;
    Py_BEGIN_CRITICAL_SECTION(self);
    u = self->unmapped;
    Py_END_CRITICAL_SECTION();
    return PyBool_FromLong(u);
}

static PyMethodDef helper_methods[] = {
    {"_set_region", (PyCFunction)helper_set_region, METH_VARARGS, "_set_region(address, size)"},
    {"_set_slots", (PyCFunction)helper_set_slots, METH_VARARGS, "_set_slots(slots, pid)"},
    {"_take", (PyCFunction)helper_take, METH_NOARGS, "a free slot, or None"},
    {"_set_dead", (PyCFunction)helper_set_dead, METH_NOARGS, "mark dead -> whether every slot is free"},
    {"_set_retired", (PyCFunction)helper_set_retired, METH_NOARGS,
     "mark retired -> whether every slot is free"},
    {"_give", (PyCFunction)helper_give, METH_O, "_give(slot) -> flags"},
    {"_waiting", (PyCFunction)helper_waiting, METH_O, "_waiting(+1 or -1)"},
    {"_maybe_unmap", (PyCFunction)helper_maybe_unmap, METH_NOARGS,
     "unmap the control region if the helper is dead and every slot is back"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef helper_getset[] = {
    {"nfree", (getter)helper_get_nfree, NULL, "free slots", NULL},
    {"unmapped", (getter)helper_get_unmapped, NULL, "whether the control region is gone", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject Helper_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ffiguard._isolate.HelperBase",
    .tp_doc = "A helper process's slot pool, and the state the host's fast path reads.",
    .tp_basicsize = sizeof(HelperObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = helper_new,
    .tp_dealloc = (destructor)helper_dealloc,
    .tp_traverse = (traverseproc)helper_traverse,
    .tp_clear = (inquiry)helper_clear,
    .tp_members = helper_members,
    .tp_methods = helper_methods,
    .tp_getset = helper_getset,
};

/* ---- Function: IsolatedFunction's C base; its tp_call is the host's fast path ---- */

static PyObject *slow_call;   /* IsolatedFunction._call(self, *args) */
static PyObject *fast_fail;   /* _fast_fail(function, helper, slot, state, args, req_len) */
static PyObject *ffg_str_wake; /* "_wake": _Helper._wake(flags) */

/* The binding (helper, fid, desc, lib_timeout) and timeout/errcheck change together,
 * inside a critical section on the function; a call copies them (with references) in
 * one, so that another thread rebinding or setting them never tears what it sees. */
typedef struct {
    PyObject_HEAD
    PyObject *timeout;        /* None: the library's */
    PyObject *errcheck;
    HelperObject *helper;     /* bound: the helper that knows fid (NULL: no fast path) */
    uint32_t fid;
    double lib_timeout;       /* seconds, 0: none */
    fastdesc desc;
} FunctionObject;

/* timeout and errcheck are T_OBJECT_EX members (attribute access to them is
 * specialized on 3.11+, and the Python path reads them on every call): their setter,
 * PyMember_SetOne, stores inside a critical section on the object in free-threaded
 * builds, the same one a call copies them in. */
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
    PyObject *helper, *desc, *old;
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
    Py_INCREF(helper);
    Py_BEGIN_CRITICAL_SECTION(self);
    self->desc = d;
    self->fid = fid;
    self->lib_timeout = lt;
    old = (PyObject *)self->helper;
    self->helper = (HelperObject *)helper;
    Py_END_CRITICAL_SECTION();
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyObject *function_unbind(FunctionObject *self, PyObject *noargs)
{
    (void)noargs;
    PyObject *old;
    Py_BEGIN_CRITICAL_SECTION(self);
    old = (PyObject *)self->helper;
    self->helper = NULL;
    Py_END_CRITICAL_SECTION();
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyObject *function_fast_bound(FunctionObject *self, void *closure)
{
    (void)closure;
    int bound;
    Py_BEGIN_CRITICAL_SECTION(self);
    bound = self->helper != NULL;
    Py_END_CRITICAL_SECTION();
    return PyBool_FromLong(bound);
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

/* What a call copied of its function (see FunctionObject), with references. */
typedef struct {
    HelperObject *h;
    PyObject *timeout, *errcheck;
    uint32_t fid;
    double lib_timeout;
    fastdesc d;
} ffg_binding;

/* Give a slot back after a fast call and tell the Python side if it must act. */
static int ffg_give_back(HelperObject *h, SlotObject *slot)
{
    int flags = ffg_pool_give(h, slot);
    if (!flags)
        return 0;
    PyObject *f = PyLong_FromLong(flags);
    PyObject *x = f ? PyObject_CallMethodObjArgs((PyObject *)h, ffg_str_wake, f, NULL) : NULL;
    Py_XDECREF(f);
    if (!x)
        return -1;
    Py_DECREF(x);
    return 0;
}

static PyObject *ffg_fast_call(PyObject *op, const ffg_binding *b, PyObject *args, PyObject *kw)
{
    HelperObject *h = b->h;
    const fastdesc *d = &b->d;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if ((kw && PyDict_GET_SIZE(kw)) || n != d->nargs || !ffg_is_false(&h->dead) ||
        !ffg_is_false(&h->retired))
        return call_slow(op, args, kw);

    /* The arguments, before taking a slot: anything unusual goes the Python way. */
    union { unsigned char b[256]; uint64_t align; } req;
    memset(req.b, 0, d->argsize);
    int strict = d->flags & FD_STRICT;
    for (Py_ssize_t k = 0; k < n; k++)
        if (!pack_arg(d->code[k], strict, PyTuple_GET_ITEM(args, k), req.b + d->off[k]))
            return call_slow(op, args, kw);
    double timeout = b->lib_timeout;
    if (b->timeout != Py_None) {
        if (!PyFloat_CheckExact(b->timeout) && !PyLong_CheckExact(b->timeout))
            return call_slow(op, args, kw);
        timeout = PyFloat_AsDouble(b->timeout);
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
    SlotObject *slot = ffg_pool_take(h);
    if (!slot) /* none free (the Python path waits for one), or the region is gone */
        return call_slow(op, args, kw);

    PyObject *result = NULL;
    unsigned char *base = (unsigned char *)ffg_slot_begin_call((PyObject *)slot);
    unsigned char *payload = base + SLOT_HEAD;
    memcpy(payload, req.b, d->argsize);
    uint32_t head[3] = {b->fid, 0, d->argsize};
    memcpy(base + OFF_OP, head, sizeof head);
    uint32_t raw;
    int rc = run_exchange((slot_head *)base, ST_CALL, ST_CALL, deadline, h->cpid, &raw);
    if (rc == ST_REPLY) {
        uint32_t status;
        memcpy(&status, base + OFF_STATUS, 4);
        if (status == 0) { /* OK; the result is where this side says, inside the slot */
            result = d->rescode ? unpack_value(d->rescode, payload + align16(d->argsize))
                                : Py_NewRef(Py_None);
            if (!result)
                goto fail_hook;
            if (ffg_give_back(h, slot) < 0)
                Py_CLEAR(result);
            Py_DECREF(slot);
            if (result && b->errcheck != Py_None) {
                PyObject *checked = PyObject_CallFunctionObjArgs(b->errcheck, result, op, args, NULL);
                Py_DECREF(result);
                return checked;
            }
            return result;
        }
    }
fail_hook: {
        /* Not a plain success: the Python side makes the exception (and gives the slot
         * back). */
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
        if (!r && !(state && size && fast_fail)) /* the hook never ran: give the slot back */
            ffg_pool_give(h, slot);
        Py_XDECREF(state);
        Py_XDECREF(size);
        Py_DECREF(slot);
        if (exc_type) { /* Ctrl-C (or a failed result conversion): that exception wins */
            Py_XDECREF(r);
            PyErr_Restore(exc_type, exc_val, exc_tb);
            return NULL;
        }
        return r;
    }
}

static PyObject *function_call(PyObject *op, PyObject *args, PyObject *kw)
{
    FunctionObject *self = (FunctionObject *)op;
    ffg_binding b;
    b.h = NULL;
    Py_BEGIN_CRITICAL_SECTION(op);
    if (self->helper) {
        b.h = (HelperObject *)Py_NewRef(self->helper);
        b.timeout = Py_NewRef(self->timeout ? self->timeout : Py_None);
        b.errcheck = Py_NewRef(self->errcheck ? self->errcheck : Py_None);
        b.fid = self->fid;
        b.lib_timeout = self->lib_timeout;
        b.d = self->desc;
    }
    Py_END_CRITICAL_SECTION();
    if (!b.h)
        return call_slow(op, args, kw);
    PyObject *r = ffg_fast_call(op, &b, args, kw);
    Py_DECREF(b.h);
    Py_DECREF(b.timeout);
    Py_DECREF(b.errcheck);
    return r;
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
    if (!ffg_str_wake && !(ffg_str_wake = PyUnicode_InternFromString("_wake")))
        return -1;
    return 0;
}
