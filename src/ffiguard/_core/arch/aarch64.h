/* AArch64 (AAPCS64, Linux): the guard frame's layout, the stub's machine code, and the
 * signal-context fields the handler reads and rewrites. Included by aarch64.S (offsets
 * only) and by the C core.
 *
 * A guard frame holds what the thunk must give back to the caller when the foreign
 * call does not return normally: its return address (x30: AArch64 keeps it in a
 * register, not on the stack), its stack pointer, the callee-saved x19-x29 and d8-d15,
 * and FPCR (its control bits are preserved across calls, like x86's MXCSR).
 */
#ifndef FFG_ARCH_AARCH64_H
#define FFG_ARCH_AARCH64_H

#define F_LR 0
#define F_X19 8 /* x19..x29 at F_X19 + 8 * (n - 19): stored as pairs */
#define F_X20 16
#define F_X21 24
#define F_X22 32
#define F_X23 40
#define F_X24 48
#define F_X25 56
#define F_X26 64
#define F_X27 72
#define F_X28 80
#define F_X29 88
#define F_SP 96
#define F_TARGET 104
#define F_TOKEN 112
#define F_FPCR 120
#define F_D8 128 /* d8..d15 */
#define F_D10 144
#define F_D12 160
#define F_D14 176
#define F_HOST 192 /* struct ffg_host: ts, frame, depth */
#define FRAME_SIZE 224

#ifndef __ASSEMBLER__
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <signal.h>
#include <ucontext.h>
#include <asm/sigcontext.h>
#include <sys/syscall.h>
#include <sys/types.h>

struct ffg_frame {
    uint64_t lr;       /* the caller's x30 (signed with PACIASP where PAC is on) */
    uint64_t x[11];    /* x19..x29 */
    uint64_t sp;       /* the caller's stack pointer (the thunk does not move it) */
    uint64_t target;   /* the foreign function called */
    uint64_t token;    /* which GuardedFunction call this frame belongs to; 0: returned */
    uint64_t fpcr;
    uint64_t d[8];     /* d8..d15 */
    struct ffg_host host; /* the interpreter's position when the call was armed */
    uint64_t pad;      /* FRAME_SIZE stays a multiple of 16 */
};

_Static_assert(offsetof(struct ffg_frame, lr) == F_LR, "F_LR");
_Static_assert(offsetof(struct ffg_frame, x) == F_X19, "F_X19");
_Static_assert(offsetof(struct ffg_frame, x) + 10 * 8 == F_X29, "F_X29");
_Static_assert(offsetof(struct ffg_frame, fpcr) == F_FPCR, "F_FPCR");
_Static_assert(offsetof(struct ffg_frame, d) == F_D8, "F_D8");

#define FFG_ARCH_NAME "aarch64"
/* got.c (compiled cffi modules, issue 15): the dynamic relocations that fill a GOT slot
 * with a function's address: a PLT call's slot, and a slot loaded directly (-fno-plt). */
#define FFG_R_JUMP_SLOT R_AARCH64_JUMP_SLOT
#define FFG_R_GLOB_DAT R_AARCH64_GLOB_DAT
#define FFG_NREGS 34 /* x0-x30, sp, pc, pstate */
#define FFG_RED_ZONE 0 /* AAPCS64 on Linux has no red zone below sp */

#define FFG_REG_NAMES                                                                        \
    "x0", "x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "x9", "x10", "x11", "x12", "x13",     \
        "x14", "x15", "x16", "x17", "x18", "x19", "x20", "x21", "x22", "x23", "x24", "x25",   \
        "x26", "x27", "x28", "x29", "x30", "sp", "pc", "pstate"

/* No saved register here comes from an earlier exception (see x86_64.h). */
#define FFG_TRAP_REG_NAMES
#define FFG_PAGE_FAULT_REG_NAMES
#define FFG_TRAPNO_REG ""
#define FFG_TRAP_PAGE_FAULT 0

/* ---- stubs ---------------------------------------------------------------------------
 * One 16-byte stub. Both loads are pc-relative literals, so every slot is the same four
 * words: slot i's data (target, then the thunk's address) sits exactly one page after
 * slot i's code. x16/x17 are the intra-procedure-call scratch registers: no argument
 * lives there, and a BR through x16/x17 is what a `bti c` landing pad accepts.
 *   bti  c                     ; landing pad (a NOP on CPUs without BTI)
 *   ldr  x16, [pc + page - 4]  ; the target
 *   ldr  x17, [pc + page]      ; the thunk
 *   br   x17
 * LDR (literal) reaches +-1 MiB: enough for pages up to 64 KiB. */
#define FFG_STUB_SIZE 16

static inline uint32_t ffg_a64_ldr_literal(unsigned rt, size_t offset)
{
    return 0x58000000u | (uint32_t)((offset / 4) & 0x7ffff) << 5 | rt;
}

static inline void ffg_write_stub(unsigned char *p, size_t page)
{
    uint32_t insn[4] = {
        0xd503245fu,                      /* bti c */
        ffg_a64_ldr_literal(16, page - 4), /* ldr x16, target */
        ffg_a64_ldr_literal(17, page),     /* ldr x17, thunk */
        0xd61f0220u,                      /* br x17 */
    };
    memcpy(p, insn, sizeof insn);
}

/* ---- the signal context ---------------------------------------------------------------
 * Everything below runs in the signal handler: async-signal-safe (plain reads and writes
 * of the saved context, no calls). */

static inline uintptr_t ffg_uc_pc(const ucontext_t *uc) { return (uintptr_t)uc->uc_mcontext.pc; }
static inline uintptr_t ffg_uc_sp(const ucontext_t *uc) { return (uintptr_t)uc->uc_mcontext.sp; }

static inline void ffg_uc_regs(const ucontext_t *uc, uint64_t *out)
{
    memcpy(out, uc->uc_mcontext.regs, 31 * sizeof(uint64_t));
    out[31] = uc->uc_mcontext.sp;
    out[32] = uc->uc_mcontext.pc;
    out[33] = uc->uc_mcontext.pstate;
}

/* The ESR the kernel saved for this fault, from the records after the general registers
 * (uc_mcontext.__reserved): each starts with {magic, size}, a zero magic ends the list,
 * and an EXTRA_MAGIC record points at more records outside the frame (long SVE/SME
 * vectors). Returns 0 when there is none: qemu-user writes no ESR record at all. */
static inline int ffg_uc_esr(const ucontext_t *uc, uint64_t *esr)
{
    const unsigned char *p = uc->uc_mcontext.__reserved;
    const unsigned char *end = p + sizeof uc->uc_mcontext.__reserved;
    int followed_extra = 0;
    while (p + sizeof(struct _aarch64_ctx) <= end) {
        struct _aarch64_ctx head;
        memcpy(&head, p, sizeof head);
        if (head.magic == 0)
            return 0; /* the terminator (the extra space ends with one too) */
        if (head.size < sizeof head || head.size % 16 || head.size > (size_t)(end - p))
            return 0; /* malformed: stop rather than wander */
        if (head.magic == ESR_MAGIC && head.size >= sizeof(struct esr_context)) {
            memcpy(esr, p + offsetof(struct esr_context, esr), sizeof *esr);
            return 1;
        }
        if (head.magic == EXTRA_MAGIC && !followed_extra && head.size >= sizeof(struct extra_context)) {
            uint64_t datap;
            uint32_t size;
            memcpy(&datap, p + offsetof(struct extra_context, datap), sizeof datap);
            memcpy(&size, p + offsetof(struct extra_context, size), sizeof size);
            /* The kernel puts the terminator right after this record and continues at
             * datap: the extra space is part of the same signal frame. */
            followed_extra = 1;
            p = (const unsigned char *)(uintptr_t)datap;
            end = p + size;
            continue;
        }
        p += head.size;
    }
    return 0;
}

/* What the faulting access was: 0 unknown, 1 read, 2 write, 3 instruction fetch.
 * *from_context says whether the saved context (the ESR) answered; without an ESR
 * record a fetch is still recognised by the fault address being the pc itself (a load
 * from its own instruction's address cannot fault on an executable page). */
static inline int ffg_uc_access(const ucontext_t *uc, uintptr_t address, int *from_context)
{
    uint64_t esr;
    *from_context = ffg_uc_esr(uc, &esr);
    if (*from_context) {
        unsigned ec = (unsigned)(esr >> 26) & 0x3f;
        if (ec == 0x20 || ec == 0x21) /* instruction abort, from EL0 / EL1 */
            return 3;
        if (ec == 0x24 || ec == 0x25) /* data abort: WnR (bit 6); CM (bit 8) cache ops read */
            return (esr & (1u << 6)) && !(esr & (1u << 8)) ? 2 : 1;
        return 0;
    }
    return address == ffg_uc_pc(uc) ? 3 : 0;
}

/* Whether this thread sent itself the signal: it is delivered as the tgkill system call
 * that sent it returns (glibc's raise(), abort(), pthread_kill() of the thread itself),
 * so the instruction before pc is `svc #0`, x8 still holds tgkill's number and x1/x2
 * this thread and this signal (x0 now holds the result). A pthread_kill from another
 * thread carries the same siginfo but interrupts this one anywhere. */
#define FFG_SVC_0 0xd4000001u
#define FFG_INSN_LEN 4

static inline int ffg_uc_self_sent(const ucontext_t *uc, int signo, pid_t pid, pid_t tid, size_t page)
{
    (void)pid; /* tgkill's first argument was in x0, which now holds its result */
    const mcontext_t *m = &uc->uc_mcontext;
    if (m->pc % page < FFG_INSN_LEN) /* the instruction before pc is on another page */
        return 0;
    uint32_t insn;
    memcpy(&insn, (const void *)(uintptr_t)(m->pc - FFG_INSN_LEN), sizeof insn);
    return insn == FFG_SVC_0 && m->regs[8] == SYS_tgkill && m->regs[1] == (uint64_t)tid &&
           m->regs[2] == (uint64_t)signo;
}

/* ---- unwinding (unwind.c), in the signal handler: async-signal-safe -----------------
 * DWARF register numbers (AADWARF64): 0-30 x0-x30 (x30 is the return address column),
 * 31 sp; the vector registers (64-95) are not needed for the walk. */
#define FFG_UNW_NREGS 32
#define FFG_UNW_SP 31
#define FFG_UNW_LR 30

static inline void ffg_unw_regs_from_uc(const ucontext_t *uc, uintptr_t *r)
{
    for (int i = 0; i < FFG_UNW_SP; i++)
        r[i] = (uintptr_t)uc->uc_mcontext.regs[i];
    r[FFG_UNW_SP] = (uintptr_t)uc->uc_mcontext.sp;
}

/* A return address signed with PACIASP/PACIBSP (the CFA program says so with
 * DW_CFA_AARCH64_negate_ra_state) carries its signature in the top bits: XPACLRI
 * strips it. XPACLRI is a hint (a NOP without PAC), and on an unsigned address it
 * changes nothing, so every return address goes through it. */
static inline uintptr_t ffg_unw_strip_ra(uintptr_t ra)
{
    register uintptr_t lr __asm__("x30") = ra;
    __asm__("hint 7" : "+r"(lr)); /* xpaclri */
    return lr;
}

/* A call to a bad address (e.g. through NULL), where nothing describes pc: BLR left
 * the caller's return address in x30 (unless x30 is the bad pc itself: a RET to
 * garbage), and sp is the caller's. */
static inline int ffg_unw_bad_call(uintptr_t *r, uintptr_t pc, uintptr_t lo, uintptr_t hi, uintptr_t *ret)
{
    (void)lo, (void)hi;
    *ret = ffg_unw_strip_ra(r[FFG_UNW_LR]);
    return *ret != pc && *ret != 0;
}

/* Make sigreturn resume at the thunk's recovery path (ffg_thunk_recover) as if the
 * foreign function had returned 0: sp and x20-x29 from the frame, x19 = the frame (the
 * return path expects it there), x0 = x1 = 0. The recovery path itself reloads d8-d15
 * and FPCR from the frame and zeroes v0-v3, so no vector register is edited here (the
 * FPSIMD record would be overridden by an SVE record carrying live Z registers).
 * PSTATE.BTYPE is cleared: the fault may have hit the first instruction after a branch,
 * and the resume point is not a landing pad. */
static inline void ffg_uc_recover(ucontext_t *uc, const struct ffg_frame *frame, uintptr_t resume)
{
    mcontext_t *m = &uc->uc_mcontext;
    m->pc = resume;
    m->sp = frame->sp;
    m->regs[19] = (uintptr_t)frame;
    for (int i = 20; i <= 29; i++)
        m->regs[i] = frame->x[i - 19];
    m->regs[0] = 0;
    m->regs[1] = 0;
    m->pstate &= ~(uint64_t)0xc00; /* BTYPE, bits 11:10 */
}
#endif /* __ASSEMBLER__ */
#endif
