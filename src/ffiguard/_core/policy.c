/* ffiguard._core.Policy: what a library's functions do after one of them faulted. */
#include "core.h"

PyObject *ffg_quarantine_error;

static PyObject *ffg_policy_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "on_fault", NULL};
    PyObject *name, *on_fault;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:Policy", kwlist, &name, &on_fault))
        return NULL;
    ffg_Policy *self = (ffg_Policy *)type->tp_alloc(type, 0);
    if (self) {
        self->name = Py_NewRef(name);
        self->on_fault = Py_NewRef(on_fault);
    }
    return (PyObject *)self;
}

static int ffg_policy_traverse(ffg_Policy *self, visitproc visit, void *arg)
{
    Py_VISIT(self->name);
    Py_VISIT(self->on_fault);
    return 0;
}

static int ffg_policy_clear(ffg_Policy *self)
{
    Py_CLEAR(self->name);
    Py_CLEAR(self->on_fault);
    return 0;
}

static void ffg_policy_dealloc(ffg_Policy *self)
{
    PyObject_GC_UnTrack(self);
    ffg_policy_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *ffg_policy_get_quarantined(ffg_Policy *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(__atomic_load_n(&self->quarantined, __ATOMIC_RELAXED));
}

static int ffg_policy_set_quarantined(ffg_Policy *self, PyObject *value, void *closure)
{
    (void)closure;
    int v = value ? PyObject_IsTrue(value) : 0;
    if (v < 0)
        return -1;
    __atomic_store_n(&self->quarantined, v, __ATOMIC_RELAXED); /* read by every call, any thread */
    return 0;
}

static PyObject *ffg_policy_get(PyObject *field) { return Py_NewRef(field); }
static PyObject *ffg_policy_get_name(ffg_Policy *self, void *closure) { (void)closure; return ffg_policy_get(self->name); }
static PyObject *ffg_policy_get_on_fault(ffg_Policy *self, void *closure) { (void)closure; return ffg_policy_get(self->on_fault); }

static int ffg_policy_set_on_fault(ffg_Policy *self, PyObject *value, void *closure)
{
    (void)closure;
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "on_fault cannot be deleted");
        return -1;
    }
    Py_XSETREF(self->on_fault, Py_NewRef(value));
    return 0;
}

static PyGetSetDef ffg_policy_getset[] = {
    {"quarantined", (getter)ffg_policy_get_quarantined, (setter)ffg_policy_set_quarantined, NULL, NULL},
    {"on_fault", (getter)ffg_policy_get_on_fault, (setter)ffg_policy_set_on_fault, NULL, NULL},
    {"name", (getter)ffg_policy_get_name, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject ffg_Policy_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ffiguard._core.Policy",
    .tp_doc = PyDoc_STR("Policy(name, on_fault): what a library's functions do after a fault"),
    .tp_basicsize = sizeof(ffg_Policy),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = ffg_policy_new,
    .tp_dealloc = (destructor)ffg_policy_dealloc,
    .tp_traverse = (traverseproc)ffg_policy_traverse,
    .tp_clear = (inquiry)ffg_policy_clear,
    .tp_getset = ffg_policy_getset,
};
