/* shield mode (issue 13): the host's memory locked during guarded foreign calls.
 *
 * What the other C files see of shield.c. Everything here marked "handler" is
 * async-signal-safe. The per-architecture parts (reading/writing PKRU, finding PKRU in
 * the signal frame) are in arch/<arch>.h, in blocks marked "shield"; an architecture
 * without them (FFG_ARCH_HAS_PKEYS undefined) gets the mprotect fallback only.
 */
#ifndef FFG_SHIELD_H
#define FFG_SHIELD_H

#include "state.h"

/* ffg_shield_mode: what a guarded call with shield on does. */
#define FFG_SHIELD_OFF 0      /* nothing shielded: no cost beyond one load */
#define FFG_SHIELD_PKEYS 1    /* the thunk locks PKRU around the call */
#define FFG_SHIELD_FALLBACK 2 /* gf_vectorcall mprotects the regions around the call */

/* The token's top bit tells the thunk "lock PKRU for this call" (arch/x86_64.S tests it
 * with one compare; tokens are a per-thread counter and never reach it). */
#define FFG_SHIELD_TOKEN_BIT ((uint64_t)1 << 63)

extern int ffg_shield_mode __attribute__((visibility("hidden"))); /* relaxed atomic loads */

/* gf_vectorcall, mprotect fallback: lock before the call (0, or -1 with a Python
 * exception), unlock after. Normal context. */
int ffg_shield_fallback_lock(void);
void ffg_shield_fallback_unlock(void);

/* handler: a fault that is shield's business (a touch of a shielded region outside
 * foreign code): made good in the saved context; returns 1, the handler just returns
 * and the access runs again. `foreign` says whether the fault belongs to a guarded
 * foreign call (the handler's guard frame), which shield never takes. */
int ffg_shield_fixup(int signo, siginfo_t *si, ucontext_t *uc, int foreign);
/* handler: where to resume a recovered call (a shielded frame has its own return path,
 * which restores the caller's PKRU). */
uintptr_t ffg_shield_resume(const struct ffg_frame *f);
/* handler: open ffiguard's keys before a previous handler runs (faulthandler walks the
 * heap). */
void ffg_shield_before_chain(void);

/* shield_heap.c (shield_interpreter): a key for the interpreter's arenas, allocated
 * once, write-disabled with the others during shielded calls; FFG_SHIELD_MODE stays on
 * from then. The key, or -1 with the reason in `why`. Normal context. */
int ffg_shield_heap_key(char *why, size_t why_size);

/* shield_heap.c's Python functions, in ffg_shield_methods. */
PyObject *ffg_shield_heap_m_enable(PyObject *m, PyObject *args);
PyObject *ffg_shield_heap_m_wrap_new(PyObject *m, PyObject *type);
PyObject *ffg_shield_heap_m_outside(PyObject *m, PyObject *delta);
PyObject *ffg_shield_heap_m_stats(PyObject *m, PyObject *noargs);
#define FFG_SHIELD_HEAP_METHODS                                                              \
    {"shield_heap_enable", ffg_shield_heap_m_enable, METH_VARARGS,                         \
     "shield_heap_enable() -> pkey: the interpreter's new arenas under a write-disabled "  \
     "key (raises RuntimeError with the reason where impossible)"},                         \
    {"shield_heap_wrap_new", ffg_shield_heap_m_wrap_new, METH_VARARGS,                      \
     "shield_heap_wrap_new(ctypes type, meta=False): its instances are allocated outside " \
     "the arenas; meta: the classes a ctypes metatype makes from now on are"},              \
    {"shield_heap_outside", ffg_shield_heap_m_outside, METH_O,                              \
     "shield_heap_outside(+1 | -1): this thread's allocations go outside the arenas "      \
     "while the count is positive; returns the new count"},                                 \
    {"shield_heap_stats", ffg_shield_heap_m_stats, METH_NOARGS,                             \
     "{'key': k, 'arenas': tagged, 'untagged': n, 'outside': allocations moved}"},

/* module.c: the Python functions (shield_*), added to ffiguard._core. */
extern PyMethodDef ffg_shield_methods[];

#endif
