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

#define SLOT 16

struct block {
    unsigned char *code; /* page_size bytes of code, then page_size bytes of data */
    size_t used;
    struct block *next;
};

static struct block *blocks;

#ifndef FFG_NO_ARCH
/* One slot of x86-64 code. Both loads are rip-relative, so every slot is the same
 * bytes: slot i's data sits exactly one page after slot i's code.
 *   mov r11, [rip + page-7]    ; the target (no argument uses r11)
 *   jmp [rip + page+8-13]      ; the thunk
 *   int3 x3                    ; padding
 */
static void write_slot(unsigned char *p, size_t page)
{
    int32_t to_target = (int32_t)(page - 7);
    int32_t to_thunk = (int32_t)(page + 8 - 13);
    p[0] = 0x4c, p[1] = 0x8b, p[2] = 0x1d;
    memcpy(p + 3, &to_target, 4);
    p[7] = 0xff, p[8] = 0x25;
    memcpy(p + 9, &to_thunk, 4);
    p[13] = p[14] = p[15] = 0xcc;
}
#endif

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
        write_slot(mem + off, page);
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
