/* The fast path's request format, read by both sides: a function's descriptor checked
 * (host_fast.c when binding, helper_loop.c per request) and a number read out of a slot
 * (the helper's arguments, the host's result).  The format is in isolate.h. */
#include "isolate.h"

/* Parse and check a descriptor: every argument inside argsize, aligned, no overlap
 * with the result, the result inside `limit` bytes of payload. */
int parse_desc(PyObject *o, fastdesc *d, Py_ssize_t limit)
{
    if (!PyBytes_Check(o) || PyBytes_GET_SIZE(o) < 4)
        goto bad;
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(o);
    Py_ssize_t len = PyBytes_GET_SIZE(o);
    d->nargs = b[0];
    d->rescode = b[1];
    d->argsize = b[2];
    d->flags = b[3];
    if (d->nargs > FAST_MAXARGS || len != 4 + 2 * (Py_ssize_t)d->nargs)
        goto bad;
    if (d->rescode && (!code_size(d->rescode) || d->rescode == 'P'))
        goto bad;
    if (align16(d->argsize) + 8 > limit)
        goto bad;
    unsigned end = 0;
    for (int k = 0; k < d->nargs; k++) {
        int c = b[4 + 2 * k], off = b[5 + 2 * k], n = code_size(c);
        if (!n || off % n || (unsigned)off < end || off + n > d->argsize)
            goto bad;
        d->code[k] = (unsigned char)c;
        d->off[k] = (unsigned char)off;
        end = (unsigned)(off + n);
    }
    return 0;
bad:
    PyErr_SetString(PyExc_ValueError, "ffiguard isolate: bad fast-path descriptor");
    return -1;
}

/* A number read from the slot as a Python object (the helper's arguments, the host's
 * result).  NULL with an exception on failure. */
PyObject *unpack_value(int code, const unsigned char *src)
{
    switch (code) {
    case 'b': { int8_t x; memcpy(&x, src, 1); return PyLong_FromLong(x); }
    case 'B': return PyLong_FromLong(*src);
    case 'h': { int16_t x; memcpy(&x, src, 2); return PyLong_FromLong(x); }
    case 'H': { uint16_t x; memcpy(&x, src, 2); return PyLong_FromLong(x); }
    case 'i': { int32_t x; memcpy(&x, src, 4); return PyLong_FromLong(x); }
    case 'I': { uint32_t x; memcpy(&x, src, 4); return PyLong_FromUnsignedLong(x); }
    case 'l': case 'q': case 'P': { int64_t x; memcpy(&x, src, 8); return PyLong_FromLongLong(x); }
    case 'L': case 'Q': { uint64_t x; memcpy(&x, src, 8); return PyLong_FromUnsignedLongLong(x); }
    case 'f': { float x; memcpy(&x, src, 4); return PyFloat_FromDouble(x); }
    case 'd': { double x; memcpy(&x, src, 8); return PyFloat_FromDouble(x); }
    case '?': return PyBool_FromLong(*src != 0);
    case 'c': return PyBytes_FromStringAndSize((const char *)src, 1);
    default:
        PyErr_SetString(PyExc_SystemError, "ffiguard isolate: bad type code");
        return NULL;
    }
}
