/* Stubs: one tiny piece of code per guarded function, the address ctypes calls.
 *
 * A stub loads its target into the thunk's scratch register and jumps to the thunk.
 * Stubs live in blocks of two pages: a code page, written once and then made
 * read+execute before any stub in it is handed out (no page is ever writable and
 * executable), and the data page right after it, where slot i holds stub i's target
 * and the thunk's address. Handing out a stub only writes the data page.
 *
 * Stubs are never freed: each distinct function costs 16 bytes of code and 16 of data,
 * and the Python layer reuses the stub of a target it has seen. Called with the GIL
 * held, which serialises allocation.
 */
#define _GNU_SOURCE 1
#include "state.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SLOT FFG_STUB_SIZE /* the code of one stub: arch/<arch>.h */

struct block {
    unsigned char *code; /* page_size bytes of code, then page_size bytes of data */
    size_t used;
    struct block *next;
};

static struct block *blocks;


static struct block *new_block(size_t page)
{
#ifdef FFG_NO_ARCH
    (void)page;
    errno = ENOSYS;
    return NULL;
#else
    struct block *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    unsigned char *mem = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        free(b);
        return NULL;
    }
    for (size_t off = 0; off < page; off += SLOT)
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
    b->next = blocks;
    blocks = b;
    return b;
#endif
}

uintptr_t ffg_stub_new(uintptr_t target)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    struct block *b = blocks;
    if (!b || b->used + SLOT > page) {
        b = new_block(page);
        if (!b)
            return 0;
    }
    unsigned char *code = b->code + b->used;
    uintptr_t *data = (uintptr_t *)(code + page);
    data[0] = target;
    data[1] = (uintptr_t)&ffg_thunk;
    b->used += SLOT;
    return (uintptr_t)code;
}

uintptr_t ffg_stub_target(uintptr_t stub)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (struct block *b = blocks; b; b = b->next) {
        uintptr_t start = (uintptr_t)b->code;
        if (stub >= start && stub < start + b->used && (stub - start) % SLOT == 0)
            return *(uintptr_t *)(stub + page);
    }
    return 0;
}
