/* The helper's C loop: it answers the number-only requests of the fast path (see
 * isolate.h) without running the Python loop, and hands everything else back to it. */
#include "isolate.h"

#include <string.h>

/* list[i] as a new reference, NULL (with IndexError) when out of range: safe while
 * other threads append (PyList_GetItemRef takes the list's lock where there is one). */
static PyObject *ffg_list_get_ref(PyObject *list, Py_ssize_t i)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyList_GetItemRef(list, i);
#else
    return Py_XNewRef(PyList_GetItem(list, i));
#endif
}

/* Helper: a ctypes result into the slot, as struct.pack_into would (ctypes results are
 * already in range).  -1 with an exception if it is not a number of that kind. */
static int pack_result(int code, PyObject *r, unsigned char *dst)
{
    switch (code) {
    case 'f': case 'd': {
        double v = PyFloat_AsDouble(r);
        if (v == -1.0 && PyErr_Occurred())
            return -1;
        if (code == 'd')
            memcpy(dst, &v, 8);
        else {
            float f = (float)v;
            memcpy(dst, &f, 4);
        }
        return 0;
    }
    case '?': {
        int t = PyObject_IsTrue(r);
        if (t < 0)
            return -1;
        *dst = (unsigned char)t;
        return 0;
    }
    case 'c':
        if (!PyBytes_Check(r) || PyBytes_GET_SIZE(r) != 1) {
            PyErr_SetString(PyExc_TypeError, "c_char result is not one byte");
            return -1;
        }
        *dst = (unsigned char)PyBytes_AS_STRING(r)[0];
        return 0;
    default: {
        if (!PyLong_Check(r)) {
            PyErr_SetString(PyExc_TypeError, "integer result expected");
            return -1;
        }
        unsigned long long u = PyLong_AsUnsignedLongLongMask(r);
        if (u == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        int n = code_size(code);
        if (n == 1) { uint8_t x = (uint8_t)u; memcpy(dst, &x, 1); }
        else if (n == 2) { uint16_t x = (uint16_t)u; memcpy(dst, &x, 2); }
        else if (n == 4) { uint32_t x = (uint32_t)u; memcpy(dst, &x, 4); }
        else memcpy(dst, &u, 8);
        return 0;
    }
    }
}

/* serve(slot_address, set_state, wait_while, table, limit) -> state
 *
 * Store set_state (if >= 0), wait while the state is wait_while, then serve requests
 * for functions whose table entry (table[fid]) is a (guarded function, descriptor)
 * tuple, replying to each and waiting for the next.  Returns the state CALL when a
 * request needs the Python path (an admin request, a function without an entry, a
 * request of another size, a negative pointer); raises the exception of a fast call
 * that failed (the request is then still unanswered: the caller replies).  The host's
 * lengths are not trusted: a fast request must have exactly its descriptor's size. */
PyObject *serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long addr, set_state, wait_while, limit;
    (void)self;
    if (nargs != 5 || !PyList_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "serve(slot_address, set_state, wait_while, table, limit)");
        return NULL;
    }
    PyObject *table = args[3];
    if (as_ll(args[0], &addr) || as_ll(args[1], &set_state) || as_ll(args[2], &wait_while) ||
        as_ll(args[4], &limit))
        return NULL;
    if (!addr || (addr & 63) || limit < 4096) {
        PyErr_SetString(PyExc_ValueError, "serve(): bad slot");
        return NULL;
    }
    unsigned char *base = (unsigned char *)(uintptr_t)addr, *payload = base + SLOT_HEAD;
    slot_head *h = (slot_head *)base;
    for (;;) {
        uint32_t raw;
        int st = run_exchange(h, set_state, (uint32_t)wait_while, 0, 0, &raw);
        if (st == RC_PYERR)
            return NULL;
        set_state = -1;
        if (st != ST_CALL) { /* only the host moves a slot to CALL; anything else is noise */
            wait_while = raw;
            continue;
        }
        uint32_t head[3];
        memcpy(head, base + OFF_OP, sizeof head);
        uint32_t op = head[0], req_len = head[2];
        if (op & ADMIN_BIT)
            return PyLong_FromLong(st);
        /* A strong reference: other slot threads append to the table meanwhile. */
        PyObject *entry = ffg_list_get_ref(table, (Py_ssize_t)op);
        if (!entry) {
            PyErr_Clear();
            return PyLong_FromLong(st);
        }
        fastdesc d;
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2 ||
            parse_desc(PyTuple_GET_ITEM(entry, 1), &d, limit) < 0 || req_len != d.argsize) {
            PyErr_Clear();
            Py_DECREF(entry);
            return PyLong_FromLong(st);
        }
        union { unsigned char b[256]; uint64_t align; } req;
        memcpy(req.b, payload, d.argsize); /* read the host's bytes once */
        PyObject *stack[FAST_MAXARGS];
        int k;
        for (k = 0; k < d.nargs; k++) {
            if (d.code[k] == 'P') {
                int64_t v;
                memcpy(&v, req.b + d.off[k], 8);
                if (v < 0)
                    break; /* an offset into the slot: the Python path resolves it */
            }
            stack[k] = unpack_value(d.code[k], req.b + d.off[k]);
            if (!stack[k])
                break;
        }
        if (k < d.nargs) {
            for (int j = 0; j < k; j++)
                Py_DECREF(stack[j]);
            Py_DECREF(entry);
            if (PyErr_Occurred())
                return NULL;
            return PyLong_FromLong(st);
        }
        PyObject *r = PyObject_Vectorcall(PyTuple_GET_ITEM(entry, 0), stack, (size_t)d.nargs, NULL);
        Py_DECREF(entry);
        for (k = 0; k < d.nargs; k++)
            Py_DECREF(stack[k]);
        if (!r)
            return NULL;
        uint32_t rep[2] = {0, 0}; /* status OK, rep_len */
        if (d.rescode) {
            int ok = pack_result(d.rescode, r, payload + align16(d.argsize));
            Py_DECREF(r);
            if (ok < 0)
                return NULL;
            rep[1] = (uint32_t)code_size(d.rescode);
        } else {
            Py_DECREF(r);
        }
        memcpy(base + OFF_STATUS, &rep[0], 4);
        memcpy(base + OFF_REP_LEN, &rep[1], 4);
        set_state = ST_REPLY;
        wait_while = ST_REPLY;
    }
}
