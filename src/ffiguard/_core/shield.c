/* shield mode (issue 13): memory the host names is locked while guarded foreign calls run.
 *
 * Two mechanisms, chosen once per process:
 *
 * - Protection keys (x86-64 with PKU): shielded regions get one of two keys, one for
 *   "read-only" (write-disabled during a call) and one for "none" (access-disabled).
 *   Outside guarded calls every thread has both keys open. A shielded guarded call gets
 *   the token bit FFG_SHIELD_TOKEN_BIT from gf_vectorcall; the thunk (arch/x86_64.S)
 *   then saves PKRU in the guard frame, writes the locked value
 *   (PKRU & ffg_shield_keep | ffg_shield_lockbits), calls, and writes the saved value
 *   back, on the fault path too (the handler resumes at ffg_thunk_shield_recover). No
 *   system call on the call path, whatever the size shielded.
 *
 * - The mprotect fallback (no protection keys: most VMs, AArch64): gf_vectorcall
 *   mprotects every region to PROT_READ / PROT_NONE before a shielded call and back to
 *   read-write after it (process-wide: nested and concurrent calls share one count).
 *
 * The handler hook ffg_shield_fixup makes the locks invisible to everything that is not
 * guarded foreign code: a protection-key fault on one of ffiguard's keys outside foreign
 * code (a thread that existed before the key was allocated: its PKRU keeps new keys
 * access-disabled; a Python callback inside a guarded call) opens ffiguard's keys in
 * the signal frame's saved PKRU and returns, so the access runs again; under the
 * fallback, a fault on a locked region outside foreign code (another thread, a
 * callback) makes the region read-write again (for the rest of that call: the
 * fallback's protection is process-wide) and returns.
 *
 * Regions are kept in a fixed table in .bss (key 0, never the Python heap): the handler
 * reads it lock-free; normal context changes it under ffg_shield_lock.
 */
#include "core.h"
#include "shield.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FFG_SHIELD_MAX_REGIONS 256
#define FFG_SEGV_PKUERR 4 /* si_code of a protection-key fault (older headers lack it) */
#define FFG_NO_KEY (-1)

enum ffg_shield_access { FFG_SHIELD_READ_ONLY = 1, FFG_SHIELD_NONE = 2 };

struct ffg_shield_region {
    uintptr_t start, length; /* whole pages */
    int access;              /* enum ffg_shield_access */
    int used;                /* written last when added, first when removed */
    int lifted;              /* fallback: made read-write by the handler during a call */
};

/* Read by the thunk (x86_64.S), hence hidden (non-preemptible) globals. */
__attribute__((visibility("hidden"))) uint32_t ffg_shield_keep = 0xffffffffu;
__attribute__((visibility("hidden"))) uint32_t ffg_shield_lockbits = 0;

int ffg_shield_mode = FFG_SHIELD_OFF;

static struct ffg_shield_region ffg_shield_regions[FFG_SHIELD_MAX_REGIONS];
static pthread_mutex_t ffg_shield_lock = PTHREAD_MUTEX_INITIALIZER;
static int ffg_shield_nregions;              /* under ffg_shield_lock */
static int ffg_shield_mechanism = -1;        /* -1 unknown, else FFG_SHIELD_PKEYS/FALLBACK */
#ifdef FFG_ARCH_HAS_PKEYS
static int ffg_shield_key_ro = FFG_NO_KEY;   /* pkey of "read-only" regions */
static int ffg_shield_key_none = FFG_NO_KEY; /* pkey of "none" regions */
static int ffg_shield_key_heap = FFG_NO_KEY; /* pkey of the interpreter's arenas (shield_heap.c) */
static uint32_t ffg_shield_ours;             /* both PKRU bits of both keys */
static uint32_t ffg_shield_pkru_offset;      /* PKRU in the signal frame's XSAVE area */
#endif
static int ffg_shield_fallback_depth;        /* fallback: shielded calls running; under lock */
static int ffg_shield_heap_on;               /* shield_interpreter() done; under lock */
static uint64_t ffg_shield_opened;           /* handler: keys opened for a thread (atomic) */
static uint64_t ffg_shield_lifted_count;     /* handler: fallback regions lifted (atomic) */
static char ffg_shield_reason[160];          /* why this mechanism */

/* The pkey of the last protection-key fault recovered on this thread (the Python layer
 * reads it for ProtectionKeyViolation.pkey). */
#ifdef FFG_ARCH_HAS_PKEYS
void ffg_thunk_shield_recover(void); /* arch/x86_64.S: a shielded call's return path */
#endif

static __thread int ffg_shield_fault_pkey __attribute__((tls_model("initial-exec"))) = FFG_NO_KEY;

/* ---- choosing the mechanism (normal context) ---------------------------------------- */

static int ffg_shield_detect(void)
{
    if (ffg_shield_mechanism >= 0)
        return ffg_shield_mechanism;
#if defined(FFG_ARCH_HAS_PKEYS) && defined(SYS_pkey_alloc)
    long key = syscall(SYS_pkey_alloc, 0UL, 0UL);
    if (key >= 0) {
        syscall(SYS_pkey_free, key);
        ffg_shield_pkru_offset = ffg_arch_pkru_xsave_offset();
        snprintf(ffg_shield_reason, sizeof ffg_shield_reason,
                 "protection keys: pkey_alloc works (PKRU at XSAVE offset %u)",
                 (unsigned)ffg_shield_pkru_offset);
        return ffg_shield_mechanism = FFG_SHIELD_PKEYS;
    }
    snprintf(ffg_shield_reason, sizeof ffg_shield_reason,
             "mprotect fallback: pkey_alloc failed (%s): the CPU or kernel has no protection keys",
             strerror(errno));
#else
    snprintf(ffg_shield_reason, sizeof ffg_shield_reason,
             "mprotect fallback: ffiguard uses protection keys on x86-64 only (%s)", FFG_ARCH_NAME);
#endif
    return ffg_shield_mechanism = FFG_SHIELD_FALLBACK;
}

#ifdef FFG_ARCH_HAS_PKEYS
static int ffg_shield_alloc_key(int *key)
{
    if (*key != FFG_NO_KEY)
        return 0;
    /* pkey_alloc opens the key in this thread only: other threads open it on first touch
     * (ffg_shield_fixup). */
    long k = syscall(SYS_pkey_alloc, 0UL, 0UL);
    if (k < 0)
        return -1;
    *key = (int)k;
    uint32_t ours = 0, lockbits = 0;
    if (ffg_shield_key_ro != FFG_NO_KEY) {
        ours |= (FFG_PKRU_AD | FFG_PKRU_WD) << (FFG_PKRU_BITS_PER_KEY * ffg_shield_key_ro);
        lockbits |= FFG_PKRU_WD << (FFG_PKRU_BITS_PER_KEY * ffg_shield_key_ro);
    }
    if (ffg_shield_key_none != FFG_NO_KEY) {
        ours |= (FFG_PKRU_AD | FFG_PKRU_WD) << (FFG_PKRU_BITS_PER_KEY * ffg_shield_key_none);
        lockbits |= FFG_PKRU_AD << (FFG_PKRU_BITS_PER_KEY * ffg_shield_key_none);
    }
    if (ffg_shield_key_heap != FFG_NO_KEY) { /* the interpreter's arenas: write-disabled */
        ours |= (FFG_PKRU_AD | FFG_PKRU_WD) << (FFG_PKRU_BITS_PER_KEY * ffg_shield_key_heap);
        lockbits |= FFG_PKRU_WD << (FFG_PKRU_BITS_PER_KEY * ffg_shield_key_heap);
    }
    /* The handler reads ffg_shield_ours; the thunk the other two. A call that starts
     * meanwhile uses the old or the new pair: both lock what was shielded before. */
    __atomic_store_n(&ffg_shield_ours, ours, __ATOMIC_RELEASE);
    __atomic_store_n(&ffg_shield_lockbits, lockbits, __ATOMIC_RELEASE);
    __atomic_store_n(&ffg_shield_keep, ~ours, __ATOMIC_RELEASE);
    return 0;
}
#endif

static int ffg_shield_find(uintptr_t start, uintptr_t length) /* under lock */
{
    for (int i = 0; i < FFG_SHIELD_MAX_REGIONS; i++)
        if (ffg_shield_regions[i].used && ffg_shield_regions[i].start == start &&
            ffg_shield_regions[i].length == length)
            return i;
    return -1;
}

static int ffg_shield_locked_prot(int access)
{
    return access == FFG_SHIELD_NONE ? PROT_NONE : PROT_READ;
}

/* ---- the mprotect fallback around a call (normal context) -------------------------- */

int ffg_shield_fallback_lock(void)
{
    int rc = 0;
    pthread_mutex_lock(&ffg_shield_lock);
    int first = ffg_shield_fallback_depth++ == 0;
    {
        /* The first call locks every region; a nested or concurrent one those made
         * read-write meanwhile (by the handler, or a callback's shield_open). */
        for (int i = 0; i < FFG_SHIELD_MAX_REGIONS; i++) {
            struct ffg_shield_region *r = &ffg_shield_regions[i];
            if (!r->used || !(first || __atomic_load_n(&r->lifted, __ATOMIC_RELAXED)))
                continue;
            __atomic_store_n(&r->lifted, 0, __ATOMIC_RELAXED);
            if (mprotect((void *)r->start, r->length, ffg_shield_locked_prot(r->access)) != 0)
                rc = -1;
        }
    }
    pthread_mutex_unlock(&ffg_shield_lock);
    if (rc != 0) {
        int saved = errno;
        ffg_shield_fallback_unlock();
        errno = saved;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    return rc;
}

void ffg_shield_fallback_unlock(void)
{
    pthread_mutex_lock(&ffg_shield_lock);
    if (--ffg_shield_fallback_depth == 0)
        for (int i = 0; i < FFG_SHIELD_MAX_REGIONS; i++)
            if (ffg_shield_regions[i].used)
                mprotect((void *)ffg_shield_regions[i].start, ffg_shield_regions[i].length,
                         PROT_READ | PROT_WRITE);
    pthread_mutex_unlock(&ffg_shield_lock);
}

/* ---- the signal handler's part: ASYNC-SIGNAL-SAFE ----------------------------------
 * Only plain loads and stores of .bss and TLS, the saved signal context, atomics,
 * WRPKRU, and mprotect (a system call; not on POSIX's list, but on Linux a bare
 * syscall wrapper with no lock or allocation). No Python API. */

static const struct ffg_shield_region *ffg_shield_region_at(uintptr_t address)
{
    for (int i = 0; i < FFG_SHIELD_MAX_REGIONS; i++) {
        const struct ffg_shield_region *r = &ffg_shield_regions[i];
        if (__atomic_load_n(&r->used, __ATOMIC_ACQUIRE) && address - r->start < r->length)
            return r;
    }
    return NULL;
}

int ffg_shield_fixup(int signo, siginfo_t *si, ucontext_t *uc, int foreign)
{
    int mode = __atomic_load_n(&ffg_shield_mechanism, __ATOMIC_RELAXED);
    if (signo != SIGSEGV || mode < 0)
        return 0;
#ifdef FFG_ARCH_HAS_PKEYS
    if (mode == FFG_SHIELD_PKEYS) {
        if (si->si_code != FFG_SEGV_PKUERR)
            return 0;
        int key = (int)si->si_pkey;
        uint32_t ours = __atomic_load_n(&ffg_shield_ours, __ATOMIC_ACQUIRE);
        uint32_t bits = (FFG_PKRU_AD | FFG_PKRU_WD) << (FFG_PKRU_BITS_PER_KEY * key);
        if (key <= 0 || key >= 16 || !(ours & bits))
            return 0; /* not one of ffiguard's keys: never ours to swallow */
        if (foreign) {
            ffg_shield_fault_pkey = key; /* a wild access by guarded foreign code */
            return 0;
        }
        /* Python code (a thread older than the key, a callback) or any other code
         * outside guarded foreign code: open ffiguard's keys in the PKRU sigreturn
         * installs, and run the access again. If they were open already the fault is
         * not ours to explain: pass it on. */
        uint32_t *pkru = ffg_uc_pkru(uc, ffg_shield_pkru_offset);
        if (!pkru || !(*pkru & ours & bits))
            return 0;
        *pkru &= ~ours;
        ffg_uc_mark_pkru(uc);
        __atomic_fetch_add(&ffg_shield_opened, 1, __ATOMIC_RELAXED);
        return 1;
    }
#else
    (void)uc;
#endif
    /* The fallback: a locked region touched outside guarded foreign code. Locked only
     * while shielded calls run: otherwise the protection is not ours (the host's own
     * mprotect), and the fault is passed on. */
    if (si->si_code != SEGV_ACCERR || foreign ||
        __atomic_load_n(&ffg_shield_fallback_depth, __ATOMIC_RELAXED) <= 0)
        return 0;
    struct ffg_shield_region *r = (struct ffg_shield_region *)ffg_shield_region_at((uintptr_t)si->si_addr);
    if (!r)
        return 0;
    if (mprotect((void *)r->start, r->length, PROT_READ | PROT_WRITE) != 0)
        return 0;
    __atomic_store_n(&r->lifted, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&ffg_shield_lifted_count, 1, __ATOMIC_RELAXED);
    return 1;
}

uintptr_t ffg_shield_resume(const struct ffg_frame *f)
{
#ifdef FFG_ARCH_HAS_PKEYS
    if (f->token & FFG_SHIELD_TOKEN_BIT)
        return (uintptr_t)&ffg_thunk_shield_recover;
#else
    (void)f;
#endif
    return (uintptr_t)&ffg_thunk_recover;
}

void ffg_shield_before_chain(void)
{
#ifdef FFG_ARCH_HAS_PKEYS
    /* Handlers start with keys 1-15 access-disabled (PKU.md): open ffiguard's, so a
     * previous handler (faulthandler) may read shielded memory. sigreturn then installs
     * the frame's PKRU again. */
    uint32_t ours = __atomic_load_n(&ffg_shield_ours, __ATOMIC_ACQUIRE);
    if (ours)
        ffg_arch_wrpkru(ffg_arch_rdpkru() & ~ours);
#endif
}

/* ---- the interpreter's heap (shield_heap.c; normal context) ------------------------ */

int ffg_shield_heap_key(char *why, size_t why_size)
{
    int key = FFG_NO_KEY;
    pthread_mutex_lock(&ffg_shield_lock);
    int mech = ffg_shield_detect();
#ifdef FFG_ARCH_HAS_PKEYS
    if (mech == FFG_SHIELD_PKEYS) {
        if (ffg_shield_alloc_key(&ffg_shield_key_heap) == 0) {
            key = ffg_shield_key_heap;
            ffg_shield_heap_on = 1;
            __atomic_store_n(&ffg_shield_mode, FFG_SHIELD_PKEYS, __ATOMIC_RELEASE);
        } else {
            snprintf(why, why_size, "pkey_alloc failed (%s): all 15 protection keys are taken",
                     strerror(errno));
        }
    }
#endif
    if (mech != FFG_SHIELD_PKEYS)
        snprintf(why, why_size, "%s", ffg_shield_reason);
    pthread_mutex_unlock(&ffg_shield_lock);
    return key;
}

/* ---- Python functions (normal context) ---------------------------------------------- */

static PyObject *ffg_shield_m_mechanism(PyObject *m, PyObject *noargs)
{
    (void)m, (void)noargs;
    pthread_mutex_lock(&ffg_shield_lock);
    int mech = ffg_shield_detect();
    pthread_mutex_unlock(&ffg_shield_lock);
    return Py_BuildValue("(ss)", mech == FFG_SHIELD_PKEYS ? "pkeys" : "mprotect", ffg_shield_reason);
}

static int ffg_shield_parse(PyObject *args, uintptr_t *start, uintptr_t *length, int *access)
{
    unsigned long long s, n;
    int a = FFG_SHIELD_READ_ONLY;
    if (!PyArg_ParseTuple(args, "KK|i", &s, &n, &a))
        return -1;
    long page = sysconf(_SC_PAGESIZE);
    if (!s || !n || s % (unsigned long long)page || n % (unsigned long long)page) {
        PyErr_SetString(PyExc_ValueError, "shield regions are whole pages");
        return -1;
    }
    if (a != FFG_SHIELD_READ_ONLY && a != FFG_SHIELD_NONE) {
        PyErr_SetString(PyExc_ValueError, "access must be 1 (read-only) or 2 (none)");
        return -1;
    }
    *start = (uintptr_t)s, *length = (uintptr_t)n, *access = a;
    return 0;
}

/* shield_add(start, length, access) -> pkey, or None under the fallback */
static PyObject *ffg_shield_m_add(PyObject *m, PyObject *args)
{
    (void)m;
    uintptr_t start, length;
    int access;
    if (ffg_shield_parse(args, &start, &length, &access) < 0)
        return NULL;
    pthread_mutex_lock(&ffg_shield_lock);
    int mech = ffg_shield_detect(), slot = -1, key = FFG_NO_KEY, err = 0;
    const char *what = NULL;
    if (ffg_shield_find(start, length) >= 0) {
        what = "already shielded";
        goto done;
    }
    for (int i = 0; i < FFG_SHIELD_MAX_REGIONS && slot < 0; i++)
        if (!ffg_shield_regions[i].used)
            slot = i;
    if (slot < 0) {
        what = "too many shielded regions";
        goto done;
    }
#ifdef FFG_ARCH_HAS_PKEYS
    if (mech == FFG_SHIELD_PKEYS) {
        int *k = access == FFG_SHIELD_NONE ? &ffg_shield_key_none : &ffg_shield_key_ro;
        if (ffg_shield_alloc_key(k) != 0 ||
            syscall(SYS_pkey_mprotect, start, length, PROT_READ | PROT_WRITE, *k) != 0) {
            err = errno;
            goto done;
        }
        key = *k;
    }
#endif
    if (mech == FFG_SHIELD_FALLBACK && ffg_shield_fallback_depth > 0 &&
        mprotect((void *)start, length, ffg_shield_locked_prot(access)) != 0) {
        err = errno; /* shielded from inside a callback of a shielded call */
        goto done;
    }
    struct ffg_shield_region *r = &ffg_shield_regions[slot];
    r->start = start, r->length = length, r->access = access, r->lifted = 0;
    __atomic_store_n(&r->used, 1, __ATOMIC_RELEASE);
    ffg_shield_nregions++;
    __atomic_store_n(&ffg_shield_mode, mech, __ATOMIC_RELEASE);
done:
    pthread_mutex_unlock(&ffg_shield_lock);
    if (what) {
        PyErr_SetString(PyExc_ValueError, what);
        return NULL;
    }
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (key == FFG_NO_KEY)
        Py_RETURN_NONE;
    return PyLong_FromLong(key);
}

static PyObject *ffg_shield_m_remove(PyObject *m, PyObject *args)
{
    (void)m;
    uintptr_t start, length;
    int access;
    if (ffg_shield_parse(args, &start, &length, &access) < 0)
        return NULL;
    pthread_mutex_lock(&ffg_shield_lock);
    int i = ffg_shield_find(start, length), err = 0;
    if (i >= 0) {
        __atomic_store_n(&ffg_shield_regions[i].used, 0, __ATOMIC_RELEASE);
        if (--ffg_shield_nregions == 0 && !ffg_shield_heap_on)
            __atomic_store_n(&ffg_shield_mode, FFG_SHIELD_OFF, __ATOMIC_RELEASE);
#ifdef FFG_ARCH_HAS_PKEYS
        if (ffg_shield_mechanism == FFG_SHIELD_PKEYS &&
            syscall(SYS_pkey_mprotect, start, length, PROT_READ | PROT_WRITE, 0) != 0)
            err = errno;
#endif
        if (ffg_shield_mechanism == FFG_SHIELD_FALLBACK &&
            mprotect((void *)start, length, PROT_READ | PROT_WRITE) != 0)
            err = errno;
    }
    pthread_mutex_unlock(&ffg_shield_lock);
    if (i < 0) {
        PyErr_SetString(PyExc_ValueError, "not shielded");
        return NULL;
    }
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

#ifdef FFG_ARCH_HAS_PKEYS
static int ffg_shield_have_pkeys(void)
{
    return __atomic_load_n(&ffg_shield_mechanism, __ATOMIC_RELAXED) == FFG_SHIELD_PKEYS;
}
#endif

/* shield_pkru() -> this thread's PKRU, or None without protection keys */
static PyObject *ffg_shield_m_pkru(PyObject *m, PyObject *noargs)
{
    (void)m, (void)noargs;
#ifdef FFG_ARCH_HAS_PKEYS
    if (ffg_shield_have_pkeys())
        return PyLong_FromUnsignedLong(ffg_arch_rdpkru());
#endif
    Py_RETURN_NONE;
}

/* The fallback, for a callback inside shielded calls: every region read-write (open) or
 * locked again (relock), while shielded calls run. */
static int ffg_shield_fallback_set(int relock)
{
    int changed = 0;
    pthread_mutex_lock(&ffg_shield_lock);
    if (ffg_shield_fallback_depth > 0) {
        for (int i = 0; i < FFG_SHIELD_MAX_REGIONS; i++) {
            struct ffg_shield_region *r = &ffg_shield_regions[i];
            if (!r->used)
                continue;
            __atomic_store_n(&r->lifted, !relock, __ATOMIC_RELAXED);
            mprotect((void *)r->start, r->length,
                     relock ? ffg_shield_locked_prot(r->access) : PROT_READ | PROT_WRITE);
        }
        changed = 1;
    }
    pthread_mutex_unlock(&ffg_shield_lock);
    return changed;
}

#define FFG_SHIELD_FALLBACK_OPENED (-1) /* shield_open's answer under the fallback */

/* shield_open() -> what to give shield_restore: opens ffiguard's keys in this thread
 * (protection keys: returns the previous PKRU), or makes the regions read-write while
 * shielded calls run (fallback: -1, or None when there was nothing to open); for a
 * callback's duration (ffiguard.shield.callback) */
static PyObject *ffg_shield_m_open(PyObject *m, PyObject *noargs)
{
    (void)m, (void)noargs;
#ifdef FFG_ARCH_HAS_PKEYS
    if (ffg_shield_have_pkeys()) {
        uint32_t before = ffg_arch_rdpkru();
        ffg_arch_wrpkru(before & ~__atomic_load_n(&ffg_shield_ours, __ATOMIC_ACQUIRE));
        return PyLong_FromUnsignedLong(before);
    }
#endif
    if (__atomic_load_n(&ffg_shield_mechanism, __ATOMIC_RELAXED) == FFG_SHIELD_FALLBACK &&
        ffg_shield_fallback_set(0))
        return PyLong_FromLong(FFG_SHIELD_FALLBACK_OPENED);
    Py_RETURN_NONE;
}

/* shield_restore(what shield_open returned): protection keys: ffiguard's keys' bits
 * from it back in PKRU; fallback: the regions locked again if shielded calls still run */
static PyObject *ffg_shield_m_restore(PyObject *m, PyObject *value)
{
    (void)m;
    if (value == Py_None)
        Py_RETURN_NONE;
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred())
        return NULL;
    if (v == FFG_SHIELD_FALLBACK_OPENED) {
        ffg_shield_fallback_set(1);
        Py_RETURN_NONE;
    }
#ifdef FFG_ARCH_HAS_PKEYS
    if (ffg_shield_have_pkeys()) {
        uint32_t ours = __atomic_load_n(&ffg_shield_ours, __ATOMIC_ACQUIRE);
        ffg_arch_wrpkru((ffg_arch_rdpkru() & ~ours) | ((uint32_t)v & ours));
    }
#endif
    Py_RETURN_NONE;
}

static PyObject *ffg_shield_m_fault_pkey(PyObject *m, PyObject *noargs)
{
    (void)m, (void)noargs;
    int key = ffg_shield_fault_pkey;
    ffg_shield_fault_pkey = FFG_NO_KEY;
    if (key == FFG_NO_KEY)
        Py_RETURN_NONE;
    return PyLong_FromLong(key);
}

static PyObject *ffg_shield_m_stats(PyObject *m, PyObject *noargs)
{
    (void)m, (void)noargs;
    return Py_BuildValue("{sKsKsi}", "opened",
                         (unsigned long long)__atomic_load_n(&ffg_shield_opened, __ATOMIC_RELAXED),
                         "lifted",
                         (unsigned long long)__atomic_load_n(&ffg_shield_lifted_count, __ATOMIC_RELAXED),
                         "mode", __atomic_load_n(&ffg_shield_mode, __ATOMIC_RELAXED));
}

PyMethodDef ffg_shield_methods[] = {
    {"shield_mechanism", ffg_shield_m_mechanism, METH_NOARGS,
     "shield_mechanism() -> ('pkeys' | 'mprotect', reason)"},
    {"shield_add", ffg_shield_m_add, METH_VARARGS,
     "shield_add(start, length, access) -> pkey, or None under the mprotect fallback"},
    {"shield_remove", ffg_shield_m_remove, METH_VARARGS, "shield_remove(start, length)"},
    {"shield_pkru", ffg_shield_m_pkru, METH_NOARGS, "this thread's PKRU, or None"},
    {"shield_open", ffg_shield_m_open, METH_NOARGS,
     "open ffiguard's keys in this thread; returns the previous PKRU (or None)"},
    {"shield_restore", ffg_shield_m_restore, METH_O, "put back what shield_open returned"},
    {"shield_fault_pkey", ffg_shield_m_fault_pkey, METH_NOARGS,
     "the pkey of this thread's last recovered protection-key fault (consumed), or None"},
    {"shield_stats", ffg_shield_m_stats, METH_NOARGS, "{'opened': n, 'lifted': n, 'mode': m}"},
    FFG_SHIELD_HEAP_METHODS /* shield_heap.c */
    {NULL, NULL, 0, NULL},
};
