/* shield mode, the interpreter's heap (issue 13): ffiguard.shield_interpreter().
 *
 * pymalloc takes its arenas (1 MiB on 64-bit 3.10+; also 3.11+ frame-stack chunks) from
 * the arena allocator hook (PyObject_SetArenaAllocator). Ours calls the previous
 * allocator and tags what it returns with a protection key of its own
 * (ffg_shield_heap_key, shield.c), which the thunk write-disables during shielded
 * guarded calls like the "read-only" regions' key. So objects of <= 512 bytes created
 * from then on (most objects: ints, tuples, small bytes, dicts' small tables, frames)
 * cannot be written by guarded foreign code. Arenas from before stay on key 0.
 *
 * Memory that foreign code may legitimately write must not be in those arenas: ctypes'
 * objects (a CData object holds <= 16-byte values inline, larger ones in a PyMem
 * buffer, <= 512 bytes of which pymalloc also takes from an arena). So while ctypes
 * allocates an object (its CData types' tp_alloc, wrapped here), and while the Python layer
 * says so (cffi's ffi.new, shield.unprotected()), this thread's allocations in the OBJ
 * and MEM domains go outside the arenas: our domain hooks (installed over the previous
 * allocators at run time, as tracemalloc does) ask the previous allocator for at least
 * FFG_HEAP_OUTSIDE_SIZE bytes, more than pymalloc serves from arenas, so pymalloc hands
 * the request to the raw allocator itself (its accounting and any debug hooks stay
 * right), and its free/realloc give such blocks back to the raw allocator (a block not
 * in an arena: address_in_range, 3.10-3.15).
 *
 * Nothing here runs in a signal handler. Not for free-threaded builds (objects live in
 * mimalloc heaps there, with no arena hook): enable refuses with the reason.
 * Per-thread state is a C thread-local; everything else is set once, under the GIL
 * (allocator hooks are installed and ctypes' type slots replaced with it held).
 */
#include "core.h"
#include "shield.h"

#include <errno.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FFG_HEAP_SMALL_MAX 512                     /* pymalloc's SMALL_REQUEST_THRESHOLD */
#define FFG_HEAP_OUTSIDE_SIZE (FFG_HEAP_SMALL_MAX + 1) /* the least it hands to the raw allocator */
#define FFG_HEAP_MAX_NEW 8                         /* distinct originals of a wrapped slot */
#define FFG_HEAP_NO_KEY (-1)
#define FFG_HEAP_KEY0 0                            /* the default key, for arenas given back */

static int ffg_heap_key = FFG_HEAP_NO_KEY;
static long ffg_heap_page;
static PyObjectArenaAllocator ffg_heap_prev_arena;
static PyMemAllocatorEx ffg_heap_prev_obj, ffg_heap_prev_mem;
static uint64_t ffg_heap_tagged, ffg_heap_untagged, ffg_heap_moved; /* relaxed atomics */

/* > 0 while this thread's small allocations must go outside the arenas. */
static __thread int ffg_heap_outside __attribute__((tls_model("initial-exec")));

/* ---- the arena allocator ------------------------------------------------------------- */

static int ffg_heap_whole_pages(void *p, size_t size)
{
    return ((uintptr_t)p % (uintptr_t)ffg_heap_page) == 0 && size % (size_t)ffg_heap_page == 0;
}

static void *ffg_heap_arena_alloc(void *ctx, size_t size)
{
    (void)ctx;
    void *p = ffg_heap_prev_arena.alloc(ffg_heap_prev_arena.ctx, size);
#ifdef SYS_pkey_mprotect
    if (p && ffg_heap_whole_pages(p, size) &&
        syscall(SYS_pkey_mprotect, p, size, PROT_READ | PROT_WRITE, ffg_heap_key) == 0) {
        __atomic_fetch_add(&ffg_heap_tagged, 1, __ATOMIC_RELAXED);
        return p;
    }
#endif
    if (p) /* not whole pages (an allocator that is not mmap): left on key 0 */
        __atomic_fetch_add(&ffg_heap_untagged, 1, __ATOMIC_RELAXED);
    return p;
}

static void ffg_heap_arena_free(void *ctx, void *p, size_t size)
{
    (void)ctx;
#ifdef SYS_pkey_mprotect
    /* Key 0 back before the previous allocator reuses or unmaps the memory (one system
     * call per arena freed: rare). */
    if (p && ffg_heap_whole_pages(p, size))
        syscall(SYS_pkey_mprotect, p, size, PROT_READ | PROT_WRITE, FFG_HEAP_KEY0);
#endif
    ffg_heap_prev_arena.free(ffg_heap_prev_arena.ctx, p, size);
}

/* ---- the OBJ and MEM domain hooks: ctx is the previous allocator ---------------------- */

static __thread int ffg_heap_next_mem __attribute__((tls_model("initial-exec")));

/* The size to ask the previous allocator for. `mem`: a MEM-domain request, which takes
 * the one-shot ffg_heap_next_mem (an OBJ-domain request clears it). */
static size_t ffg_heap_size(size_t size, int mem)
{
    int once = ffg_heap_next_mem;
    if (once)
        ffg_heap_next_mem = 0;
    if ((ffg_heap_outside > 0 || (once && mem)) && size < FFG_HEAP_OUTSIDE_SIZE) {
        __atomic_fetch_add(&ffg_heap_moved, 1, __ATOMIC_RELAXED);
        return FFG_HEAP_OUTSIDE_SIZE;
    }
    return size;
}

static void *ffg_heap_malloc(void *ctx, size_t size)
{
    PyMemAllocatorEx *prev = ctx;
    return prev->malloc(prev->ctx, ffg_heap_size(size, prev == &ffg_heap_prev_mem));
}

static void *ffg_heap_calloc(void *ctx, size_t nelem, size_t elsize)
{
    PyMemAllocatorEx *prev = ctx;
    if (elsize == 0 || nelem <= FFG_HEAP_SMALL_MAX / elsize) {
        size_t size = nelem * elsize, asked = ffg_heap_size(size, prev == &ffg_heap_prev_mem);
        if (asked != size)
            return prev->calloc(prev->ctx, 1, asked);
    }
    return prev->calloc(prev->ctx, nelem, elsize);
}

static void *ffg_heap_realloc(void *ctx, void *ptr, size_t size)
{
    /* A block in an arena reallocated to FFG_HEAP_OUTSIDE_SIZE moves out (pymalloc's
     * realloc: larger than its size class, and too large for an arena). */
    PyMemAllocatorEx *prev = ctx;
    return prev->realloc(prev->ctx, ptr, ffg_heap_size(size, prev == &ffg_heap_prev_mem));
}

static void ffg_heap_free(void *ctx, void *ptr)
{
    PyMemAllocatorEx *prev = ctx;
    prev->free(prev->ctx, ptr);
}

/* ---- ctypes' types: their objects are created outside ------------------------------
 * Two slots are wrapped, each original kept in a small table (one wrapper function
 * per distinct original):
 * - tp_alloc of the data types (c_int, Structure subclasses, arrays, pointers, function
 *   pointers): every CData object is allocated outside (ctypes allocates them all with
 *   tp_alloc: in tp_new, for results by value, from_buffer_copy...), and so is the next
 *   MEM-domain allocation of this thread (ffg_heap_next_mem), unless an object is
 *   allocated first: ctypes allocates an object's value buffer (> 16 bytes) right
 *   after the object. When it does not (a small value, inline; an object sharing its
 *   base's buffer), an unrelated buffer goes outside instead: harmless.
 * - tp_new of ctypes' metatypes: a class made later gets the tp_alloc wrapper (type_new
 *   gives every new class PyType_GenericAlloc). */

static newfunc ffg_heap_orig_meta[FFG_HEAP_MAX_NEW];
static allocfunc ffg_heap_orig_alloc[FFG_HEAP_MAX_NEW];

static int ffg_heap_wrap_type(PyTypeObject *type);

#define FFG_HEAP_WRAPPERS(i)                                                              \
    static PyObject *ffg_heap_alloc_##i(PyTypeObject *type, Py_ssize_t n)                 \
    {                                                                                     \
        ffg_heap_outside++;                                                               \
        PyObject *obj = ffg_heap_orig_alloc[i](type, n);                                  \
        ffg_heap_outside--;                                                               \
        ffg_heap_next_mem = 1;                                                            \
        return obj;                                                                       \
    }                                                                                     \
    static PyObject *ffg_heap_meta_##i(PyTypeObject *meta, PyObject *args, PyObject *kw) \
    {                                                                                     \
        PyObject *cls = ffg_heap_orig_meta[i](meta, args, kw);                            \
        if (cls && PyType_Check(cls) && ffg_heap_wrap_type((PyTypeObject *)cls) < 0)      \
            Py_CLEAR(cls);                                                                \
        return cls;                                                                       \
    }
FFG_HEAP_WRAPPERS(0)
FFG_HEAP_WRAPPERS(1)
FFG_HEAP_WRAPPERS(2)
FFG_HEAP_WRAPPERS(3)
FFG_HEAP_WRAPPERS(4)
FFG_HEAP_WRAPPERS(5)
FFG_HEAP_WRAPPERS(6)
FFG_HEAP_WRAPPERS(7)

static const allocfunc ffg_heap_alloc_wrappers[FFG_HEAP_MAX_NEW] = {
    ffg_heap_alloc_0, ffg_heap_alloc_1, ffg_heap_alloc_2, ffg_heap_alloc_3,
    ffg_heap_alloc_4, ffg_heap_alloc_5, ffg_heap_alloc_6, ffg_heap_alloc_7,
};
static const newfunc ffg_heap_meta_wrappers[FFG_HEAP_MAX_NEW] = {
    ffg_heap_meta_0, ffg_heap_meta_1, ffg_heap_meta_2, ffg_heap_meta_3,
    ffg_heap_meta_4, ffg_heap_meta_5, ffg_heap_meta_6, ffg_heap_meta_7,
};

/* Replace *slot (a function pointer) by its wrapper: the index of its original in
 * `orig` (added if new), or -1 when it is a wrapper already; -2 when the table is full
 * (a Python exception is set). */
#define FFG_HEAP_REPLACE(slot, orig, wrappers, type, result)                              \
    do {                                                                                  \
        int ffg_i_;                                                                       \
        (result) = -1;                                                                    \
        for (ffg_i_ = 0; ffg_i_ < FFG_HEAP_MAX_NEW; ffg_i_++)                             \
            if ((slot) == (wrappers)[ffg_i_])                                             \
                break;                                                                    \
        if (ffg_i_ < FFG_HEAP_MAX_NEW)                                                    \
            break;                                                                        \
        for (ffg_i_ = 0; ffg_i_ < FFG_HEAP_MAX_NEW && (orig)[ffg_i_] && (orig)[ffg_i_] != (slot); \
             ffg_i_++)                                                                    \
            ;                                                                             \
        if (ffg_i_ == FFG_HEAP_MAX_NEW) {                                                 \
            PyErr_Format(PyExc_RuntimeError, "shield_interpreter: more than %d kinds of " \
                         "ctypes constructors (at %s)", FFG_HEAP_MAX_NEW, (type)->tp_name); \
            (result) = -2;                                                                \
            break;                                                                        \
        }                                                                                 \
        (orig)[ffg_i_] = (slot);                                                          \
        (slot) = (wrappers)[ffg_i_];                                                      \
        (result) = ffg_i_;                                                                \
    } while (0)

/* A ctypes data type (and so its instances): tp_alloc wrapped. 0, or -1 with an
 * exception. */
static int ffg_heap_wrap_type(PyTypeObject *type)
{
    int r = -1;
    if (type->tp_alloc)
        FFG_HEAP_REPLACE(type->tp_alloc, ffg_heap_orig_alloc, ffg_heap_alloc_wrappers, type, r);
    if (r >= 0)
        PyType_Modified(type);
    return r == -2 ? -1 : 0;
}

/* shield_heap_wrap_new(type): its instances are allocated outside the arenas;
 * shield_heap_wrap_new(metatype, True): the classes it makes from now on get the same.
 * Subclasses that exist already are passed here one by one (the Python layer walks
 * them). */
PyObject *ffg_shield_heap_m_wrap_new(PyObject *m, PyObject *args)
{
    (void)m;
    PyObject *arg;
    int meta = 0;
    if (!PyArg_ParseTuple(args, "O|p", &arg, &meta))
        return NULL;
    if (!PyType_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "shield_heap_wrap_new() takes a type");
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)arg;
    if (!meta)
        return ffg_heap_wrap_type(type) < 0 ? NULL : Py_NewRef(Py_None);
    if (!type->tp_new) {
        PyErr_Format(PyExc_TypeError, "%s makes no classes", type->tp_name);
        return NULL;
    }
    int r;
    FFG_HEAP_REPLACE(type->tp_new, ffg_heap_orig_meta, ffg_heap_meta_wrappers, type, r);
    if (r == -2)
        return NULL;
    if (r >= 0)
        PyType_Modified(type);
    Py_RETURN_NONE;
}

/* shield_heap_outside(+1 | -1) -> this thread's count after the change */
PyObject *ffg_shield_heap_m_outside(PyObject *m, PyObject *delta)
{
    (void)m;
    long d = PyLong_AsLong(delta);
    if (d == -1 && PyErr_Occurred())
        return NULL;
    if (d != 1 && d != -1) {
        PyErr_SetString(PyExc_ValueError, "shield_heap_outside() takes +1 or -1");
        return NULL;
    }
    if (d < 0 && ffg_heap_outside <= 0) {
        PyErr_SetString(PyExc_ValueError, "shield_heap_outside(-1) without a +1");
        return NULL;
    }
    ffg_heap_outside += (int)d;
    return PyLong_FromLong(ffg_heap_outside);
}

/* ---- switching it on ----------------------------------------------------------------- */

/* shield_heap_enable() -> the key; once per process (later calls return the key).
 * RuntimeError(reason) where it cannot work. Called with the GIL held. */
PyObject *ffg_shield_heap_m_enable(PyObject *m, PyObject *args)
{
    (void)m, (void)args;
    if (ffg_heap_key != FFG_HEAP_NO_KEY)
        return PyLong_FromLong(ffg_heap_key);
#ifdef Py_GIL_DISABLED
    (void)ffg_heap_arena_alloc, (void)ffg_heap_arena_free, (void)ffg_heap_malloc;
    (void)ffg_heap_calloc, (void)ffg_heap_realloc, (void)ffg_heap_free;
    (void)ffg_heap_prev_obj; /* only the MEM domain's is read by the hooks */
    PyErr_SetString(PyExc_RuntimeError,
                    "this is a free-threaded build: its objects live in mimalloc heaps, "
                    "which have no arena allocator hook to put under a protection key");
    return NULL;
#else
    char why[256] = "";
    int key = ffg_shield_heap_key(why, sizeof why);
    if (key < 0) {
        PyErr_SetString(PyExc_RuntimeError, why);
        return NULL;
    }
    ffg_heap_page = sysconf(_SC_PAGESIZE);
    ffg_heap_key = key;
    /* The domain hooks first: ctypes' objects must never land in a tagged arena. */
    PyMem_GetAllocator(PYMEM_DOMAIN_OBJ, &ffg_heap_prev_obj);
    PyMem_GetAllocator(PYMEM_DOMAIN_MEM, &ffg_heap_prev_mem);
    PyMemAllocatorEx obj = {&ffg_heap_prev_obj, ffg_heap_malloc, ffg_heap_calloc,
                            ffg_heap_realloc, ffg_heap_free};
    PyMemAllocatorEx mem = {&ffg_heap_prev_mem, ffg_heap_malloc, ffg_heap_calloc,
                            ffg_heap_realloc, ffg_heap_free};
    PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &obj);
    PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &mem);
    PyObject_GetArenaAllocator(&ffg_heap_prev_arena);
    PyObjectArenaAllocator arena = {NULL, ffg_heap_arena_alloc, ffg_heap_arena_free};
    PyObject_SetArenaAllocator(&arena);
    return PyLong_FromLong(key);
#endif
}

PyObject *ffg_shield_heap_m_stats(PyObject *m, PyObject *noargs)
{
    (void)m, (void)noargs;
    return Py_BuildValue("{sisKsKsK}", "key", ffg_heap_key,
                         "arenas", (unsigned long long)__atomic_load_n(&ffg_heap_tagged, __ATOMIC_RELAXED),
                         "untagged", (unsigned long long)__atomic_load_n(&ffg_heap_untagged, __ATOMIC_RELAXED),
                         "outside", (unsigned long long)__atomic_load_n(&ffg_heap_moved, __ATOMIC_RELAXED));
}
