/* An architecture without a thunk: the core builds and imports, reports SUPPORTED = 0,
 * and the Python layer raises UnsupportedPlatform instead of guarding. The handlers are
 * never installed, so these accessors are never called for real. */
#ifndef FFG_ARCH_NONE_H
#define FFG_ARCH_NONE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <ucontext.h>

struct ffg_frame {
    uint64_t ret, sp, target, token;
    struct ffg_host host;
};

#define FFG_ARCH_NAME "unsupported"
#define FFG_R_JUMP_SLOT (-1) /* got.c: no relocation matches */
#define FFG_R_GLOB_DAT (-1)
#define FFG_NREGS 1
#define FFG_REG_NAMES "pc"

/* No saved register here comes from an earlier exception (see x86_64.h). */
#define FFG_TRAP_REG_NAMES
#define FFG_PAGE_FAULT_REG_NAMES
#define FFG_TRAPNO_REG ""
#define FFG_TRAP_PAGE_FAULT 0
#define FFG_RED_ZONE 0
#define FFG_STUB_SIZE 16

static inline void ffg_write_stub(unsigned char *p, size_t page) { (void)p, (void)page; }

static inline uintptr_t ffg_uc_pc(const ucontext_t *uc) { (void)uc; return 0; }
static inline uintptr_t ffg_uc_sp(const ucontext_t *uc) { (void)uc; return 0; }
static inline void ffg_uc_regs(const ucontext_t *uc, uint64_t *out) { (void)uc; out[0] = 0; }
static inline int ffg_uc_access(const ucontext_t *uc, uintptr_t address, int *from_context)
{
    (void)uc, (void)address;
    *from_context = 0;
    return 0;
}
static inline int ffg_uc_self_sent(const ucontext_t *uc, int signo, pid_t pid, pid_t tid, size_t page)
{
    (void)uc, (void)signo, (void)pid, (void)tid, (void)page;
    return 0;
}
static inline void ffg_uc_recover(ucontext_t *uc, const struct ffg_frame *frame, uintptr_t resume)
{
    (void)uc, (void)frame, (void)resume;
}
#endif
