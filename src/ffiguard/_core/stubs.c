/* Stubs: one tiny piece of code per guarded function, the address ctypes calls.
 *
 * A stub loads its target into the thunk's scratch register and jumps to the thunk.
 * Stubs live in blocks of two pages: a code page, written once and then made
 * read+execute before any stub in it is handed out (no page is ever writable and
 * executable), and the data page right after it, where slot i holds stub i's target
 * and the thunk's address. Handing out a stub only writes the data page.
 *
 * Stubs are never freed: each distinct function costs 16 bytes of code and 16 of data,
 * and the Python layer reuses the stub of a target it has seen.
 *
 * Threads: nothing here may rely on the GIL (free-threaded CPython has none).
 * Allocation (ffg_stub_new) is serialised by a mutex: normal context only, never a
 * signal handler. Lookups (ffg_stub_target) take no lock: a block is published to them
 * only after it is complete (the list head is stored with release ordering, and a
 * block's `next` never changes after that), and a slot only after its target is
 * written (`used` grows with release ordering); readers load both with acquire
 * ordering, so a stub they can see always has its own target. Lock-free loads only:
 * ffg_stub_target would be async-signal-safe too, though it is not called from the
 * handler today.
 */
#define _GNU_SOURCE 1
#include "state.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define FFG_SLOT FFG_STUB_SIZE /* the code of one stub: arch/<arch>.h */
#define FFG_SLOT_TARGET 0      /* data slot words: the stub's target... */
#define FFG_SLOT_THUNK 1       /* ...and the thunk it jumps to */

struct ffg_block {
    unsigned char *code;    /* page_size bytes of code, then page_size bytes of data */
    _Atomic size_t used;    /* bytes of code handed out: grows with release ordering */
    struct ffg_block *next; /* older blocks; fixed before the block is published */
};

static struct ffg_block *_Atomic ffg_blocks; /* newest first; stored with release */
static pthread_mutex_t ffg_stub_lock = PTHREAD_MUTEX_INITIALIZER; /* ffg_stub_new only */

/* A new block with every stub's code written and made read+execute; not yet published.
 * Called with ffg_stub_lock held. */
static struct ffg_block *ffg_block_new(size_t page)
{
#ifdef FFG_NO_ARCH
    (void)page;
    errno = ENOSYS;
    return NULL;
#else
    struct ffg_block *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    unsigned char *mem = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        free(b);
        return NULL;
    }
    for (size_t off = 0; off < page; off += FFG_SLOT)
        ffg_write_stub(mem + off, page);
    /* Instruction and data caches are not coherent on every architecture (AArch64):
     * make the new code visible to instruction fetch (a no-op on x86-64). */
    __builtin___clear_cache((char *)mem, (char *)mem + page);
    if (mprotect(mem, page, PROT_READ | PROT_EXEC) != 0) {
        int saved = errno;
        munmap(mem, 2 * page);
        free(b);
        errno = saved;
        return NULL;
    }
    b->code = mem;
    atomic_init(&b->used, 0);
    return b;
#endif
}

uintptr_t ffg_stub_new(uintptr_t target)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t stub = 0;
    pthread_mutex_lock(&ffg_stub_lock);
    /* Under the lock: this thread is the only writer, relaxed loads see the latest. */
    struct ffg_block *b = atomic_load_explicit(&ffg_blocks, memory_order_relaxed);
    size_t used = b ? atomic_load_explicit(&b->used, memory_order_relaxed) : 0;
    int fresh = 0;
    if (!b || used + FFG_SLOT > page) {
        struct ffg_block *nb = ffg_block_new(page);
        if (!nb)
            goto out; /* errno from ffg_block_new */
        nb->next = b;
        b = nb;
        used = 0;
        fresh = 1;
    }
    unsigned char *code = b->code + used;
    uintptr_t *data = (uintptr_t *)(code + page);
    data[FFG_SLOT_TARGET] = target;
    data[FFG_SLOT_THUNK] = (uintptr_t)&ffg_thunk;
    /* Release: a reader that sees the new `used` (or the new block) sees the target. */
    atomic_store_explicit(&b->used, used + FFG_SLOT, memory_order_release);
    if (fresh)
        atomic_store_explicit(&ffg_blocks, b, memory_order_release);
    stub = (uintptr_t)code;
out:
    pthread_mutex_unlock(&ffg_stub_lock);
    return stub;
}

uintptr_t ffg_stub_target(uintptr_t stub)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (struct ffg_block *b = atomic_load_explicit(&ffg_blocks, memory_order_acquire); b; b = b->next) {
        uintptr_t start = (uintptr_t)b->code;
        size_t used = atomic_load_explicit(&b->used, memory_order_acquire);
        if (stub >= start && stub < start + used && (stub - start) % FFG_SLOT == 0)
            return ((const uintptr_t *)(stub + page))[FFG_SLOT_TARGET];
    }
    return 0;
}
