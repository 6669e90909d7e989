/* The interpreter's position on this thread, read from its thread state: which thread
 * state is attached, the innermost Python frame and the recursion counters.
 *
 * GuardedFunction records the position when it arms a call (normal context); the signal
 * handler compares it with the thread state's fields at the fault. The reads below are
 * plain loads of public PyThreadState fields (Include/cpython/pystate.h) and, for
 * ffg_py_attached, a lock-free read of the interpreter's own thread-local variable:
 * ASYNC-SIGNAL-SAFE, no locks, no allocation. They are the only version-specific
 * knowledge of the interpreter's layout in the core.
 */
#ifndef FFG_PYHOST_H
#define FFG_PYHOST_H

#include <Python.h>
#include <stdint.h>

#include "state.h"

/* The thread state attached to this thread (running Python code, or holding the GIL
 * where there is one), or NULL. 3.10/3.11 answer with the GIL holder's, whichever thread
 * that is: compare with this thread's own. */
static inline PyThreadState *ffg_py_attached(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyThreadState_GetUnchecked();
#else
    return _PyThreadState_UncheckedGet();
#endif
}

static inline uint64_t ffg_py_frame(const PyThreadState *ts)
{
#if PY_VERSION_HEX >= 0x030D0000
    return (uint64_t)(uintptr_t)ts->current_frame;
#elif PY_VERSION_HEX >= 0x030B0000
    return ts->cframe ? (uint64_t)(uintptr_t)ts->cframe->current_frame : 0;
#else
    return (uint64_t)(uintptr_t)ts->frame;
#endif
}

/* The recursion counters in one word: Python frames, and where the interpreter counts
 * them, C calls (3.12/3.13: a callable without a Python frame, called by a callback
 * through tp_call, moves it). */
static inline uint64_t ffg_py_depth(const PyThreadState *ts)
{
#if PY_VERSION_HEX >= 0x030E0000
    return (uint32_t)ts->py_recursion_remaining;
#elif PY_VERSION_HEX >= 0x030C0000
    return (uint32_t)ts->py_recursion_remaining | (uint64_t)(uint32_t)ts->c_recursion_remaining << 32;
#elif PY_VERSION_HEX >= 0x030B0000
    return (uint32_t)ts->recursion_remaining;
#else
    return (uint32_t)ts->recursion_depth;
#endif
}

static inline void ffg_py_position(PyThreadState *ts, struct ffg_host *out)
{
    out->ts = (uint64_t)(uintptr_t)ts;
    out->frame = ffg_py_frame(ts);
    out->depth = ffg_py_depth(ts);
}

#endif
