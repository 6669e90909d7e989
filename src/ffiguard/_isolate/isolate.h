/* Interfaces between the C files of ffiguard._isolate, isolate mode's native half:
 *
 *   transport.c    the shared-memory transport: futex wait/wake, spinning with leases,
 *                  exchange(), peer liveness, fixed-address mappings
 *   fast_wire.c    the number-only fast path's request format, read by both sides
 *   host_fast.c    the host's fast path: FunctionBase's tp_call (and Slot, HelperBase)
 *   helper_loop.c  the helper's C loop that answers number-only requests: serve()
 *   module.c       the method table and PyInit
 */
#ifndef FFG_ISOLATE_H
#define FFG_ISOLATE_H

#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE 1
#include <Python.h>

#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

#if PY_VERSION_HEX < 0x030A0000
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
#endif

/* Shared by these files only: hidden, so the module still exports nothing but PyInit. */
#pragma GCC visibility push(hidden)

/* Free-threaded builds: Py_BEGIN_CRITICAL_SECTION (3.13+) locks an object's mutex; with
 * a GIL it is a plain block.  Before 3.13 there is no free-threaded build, so a plain
 * block is right there too.  Inside one: no Python calls, no DECREF that could free. */
#ifndef Py_BEGIN_CRITICAL_SECTION
#define Py_BEGIN_CRITICAL_SECTION(op) { (void)(op);
#define Py_END_CRITICAL_SECTION() }
#endif

/* What a wait returns: a slot state (ST_IDLE .. ST_MAX, never negative) or one of these.
 * The state word is in shared memory the helper (untrusted) can write anything into, so
 * a value that is not a state is never passed on as a number: it is RC_PROTOCOL. */
enum { RC_TIMEOUT = -1, RC_DEAD = -2, RC_INTERRUPTED = -3, RC_PROTOCOL = -4 };
enum { RC_PYERR = -100 }; /* a Python exception is set (Ctrl-C while waiting) */
enum { ST_IDLE = 0, ST_CALL = 1, ST_REPLY = 2, ST_CB_REQ = 3, ST_CB_RET = 4,
       ST_MAX = ST_CB_RET }; /* as in ffiguard/isolate/_wire.py */

typedef struct {
    _Atomic uint32_t state;
    _Atomic uint32_t sleeping[2]; /* [0]: the host waits on state, [1]: the helper */
} slot_head;

#define MAX_LEASES 16 /* spin leases in the shared page (see transport.c) */

/* ---- the scalar fast path ----------------------------------------------------------
 *
 * A call whose arguments and result are all plain numbers (struct codes bBhHiIlLqQfd?c,
 * and P for a c_void_p argument given as a plain int or None) skips Python on both
 * sides.  Host: IsolatedFunction's C base (FunctionBase, host_fast.c) packs the
 * arguments straight into the slot, exchanges and unpacks the result.  Helper: serve()
 * (helper_loop.c) waits for requests and runs the ones of functions registered as fast
 * by calling the guarded ctypes function (ffiguard's trap, exactly as the Python path
 * does) with PyObject_Vectorcall.  Anything unusual (an argument of another type, a
 * value out of range, a full slot list, a dead or retired helper, a fault, a timeout)
 * goes to the Python code, which behaves as it always did.  The slot layout is the one
 * the Python side uses (struct "@" of the wire codes), so either side may take either
 * path for any request.
 *
 * A descriptor (bytes, built by the Python side, checked by parse_desc): [0] nargs,
 * [1] result code (0: void), [2] size of the packed arguments, [3] flags (FD_STRICT:
 * arguments were inferred without argtypes, only exact ints qualify), then (code,
 * offset) per argument. */
#define SLOT_HEAD 128
#define OFF_OP 16
#define OFF_STATUS 20
#define OFF_REQ_LEN 24
#define OFF_REP_LEN 28
#define ADMIN_BIT 0x80000000u
#define FAST_MAXARGS 24
#define FD_STRICT 1

typedef struct {
    unsigned char nargs, rescode, argsize, flags;
    unsigned char code[FAST_MAXARGS], off[FAST_MAXARGS];
} fastdesc;

static inline int code_size(int c)
{
    switch (c) {
    case 'b': case 'B': case '?': case 'c': return 1;
    case 'h': case 'H': return 2;
    case 'i': case 'I': case 'f': return 4;
    case 'l': case 'L': case 'q': case 'Q': case 'd': case 'P': return 8;
    default: return 0;
    }
}

static inline Py_ssize_t align16(Py_ssize_t n) { return (n + 15) & ~(Py_ssize_t)15; }

static inline int as_ll(PyObject *o, long long *out)
{
    *out = PyLong_AsLongLong(o);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* transport.c */
long long now_ns(void);
int run_exchange(slot_head *h, long long set_state, uint32_t wait_while, long long deadline,
                 pid_t pid, uint32_t *raw);
_Atomic int *ffg_inflight_counter(void); /* the count of calls in flight this host shares */
PyObject *exchange(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *configure(PyObject *self, PyObject *args);
PyObject *counters(PyObject *self, PyObject *noargs);
PyObject *map_shared(PyObject *self, PyObject *args);
PyObject *unmap(PyObject *self, PyObject *args);

/* fast_wire.c */
int parse_desc(PyObject *o, fastdesc *d, Py_ssize_t limit);
PyObject *unpack_value(int code, const unsigned char *src);

/* host_fast.c */
extern PyTypeObject Slot_Type, Helper_Type, Function_Type;
int ffg_slot_check(PyObject *o);                 /* is it a Slot? */
uintptr_t ffg_slot_address(PyObject *slot);      /* its header's address in this process */
uintptr_t ffg_slot_begin_call(PyObject *slot);   /* the same; its call now counts as in flight */
int host_fast_ready(void); /* the types readied, the cached names made: -1 on failure */
PyObject *set_hooks(PyObject *self, PyObject *args);

/* helper_loop.c */
PyObject *serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

#pragma GCC visibility pop

#endif
