/* x86-64 (System V ABI): the guard frame's layout and the signal-context fields the
 * handler reads and rewrites. Included by x86_64.S (offsets only) and by the C core.
 *
 * A guard frame holds what the thunk must give back to the caller when the foreign
 * call does not return normally: its return address, its stack pointer after the
 * thunk popped that address, the callee-saved registers, and the SSE/x87 control
 * words (the ABI says they are preserved across calls).
 */
#ifndef FFG_ARCH_X86_64_H
#define FFG_ARCH_X86_64_H

#define F_RET 0
#define F_SP 8
#define F_RBX 16
#define F_RBP 24
#define F_R12 32
#define F_R13 40
#define F_R14 48
#define F_R15 56
#define F_TARGET 64
#define F_TOKEN 72
#define F_HOST 80 /* struct ffg_host: ts, frame, depth */
#define F_MXCSR 104
#define F_FPUCW 108
/* shield (issue 13): at the end, see the shield block below */
#define F_PKRU 112         /* the caller's PKRU, written back on return and on recovery */
#define F_SHIELD_RAX 120   /* rax (the varargs count) while the thunk writes PKRU */
#define FRAME_SIZE 128

#ifndef __ASSEMBLER__
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <ucontext.h>

struct ffg_frame {
    uint64_t ret;    /* the caller's return address, popped off its stack */
    uint64_t sp;     /* the stack pointer after that pop */
    uint64_t rbx, rbp, r12, r13, r14, r15;
    uint64_t target; /* the foreign function called */
    uint64_t token;  /* which GuardedFunction call this frame belongs to; 0: returned */
    struct ffg_host host; /* the interpreter's position when the call was armed */
    uint32_t mxcsr;
    uint16_t fpucw;
    uint16_t pad;
    /* shield (issue 13): used only by a shielded call (token bit FFG_SHIELD_TOKEN_BIT) */
    uint32_t pkru;       /* the caller's PKRU */
    uint32_t pad2;
    uint64_t shield_rax; /* scratch: rax while the thunk writes PKRU */
};

_Static_assert(offsetof(struct ffg_frame, mxcsr) == F_MXCSR, "F_MXCSR");
_Static_assert(offsetof(struct ffg_frame, fpucw) == F_FPUCW, "F_FPUCW");
_Static_assert(offsetof(struct ffg_frame, pkru) == F_PKRU, "F_PKRU");
_Static_assert(offsetof(struct ffg_frame, shield_rax) == F_SHIELD_RAX, "F_SHIELD_RAX");
_Static_assert(sizeof(struct ffg_frame) == FRAME_SIZE, "FRAME_SIZE");

#define FFG_ARCH_NAME "x86_64"
/* got.c (compiled cffi modules, issue 15): the dynamic relocations that fill a GOT slot
 * with a function's address: a PLT call's slot, and a slot loaded directly (-fno-plt). */
#define FFG_R_JUMP_SLOT R_X86_64_JUMP_SLOT
#define FFG_R_GLOB_DAT R_X86_64_GLOB_DAT
#define FFG_NREGS 23 /* the general registers saved in the signal context */
#define FFG_RED_ZONE 128 /* bytes below rsp a leaf function may use */

/* Names of uc_mcontext.gregs[i], in glibc's REG_* order. */
#define FFG_REG_NAMES                                                                    \
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx", "rdx", \
        "rax", "rcx", "rsp", "rip", "eflags", "csgsfs", "err", "trapno", "oldmask", "cr2"

/* The registers the kernel fills from the thread's last CPU exception, not from this
 * signal: err, trapno and cr2 are stale (an earlier fault's) when the signal was sent
 * (abort(), kill: si_code <= 0), and cr2 is the faulting address of a page fault only
 * (trapno FFG_TRAP_PAGE_FAULT): reports leave out what the signal did not set. */
#define FFG_TRAP_REG_NAMES "err", "trapno", "cr2",
#define FFG_PAGE_FAULT_REG_NAMES "cr2",
#define FFG_TRAPNO_REG "trapno"
#define FFG_TRAP_PAGE_FAULT 14 /* X86_TRAP_PF: #PF, the page-fault exception */

/* One 16-byte stub. Both loads are rip-relative, so every slot is the same bytes:
 * slot i's data (target, then the thunk's address) sits exactly one page after slot
 * i's code.
 *   mov r11, [rip + page-7]    ; the target (no argument uses r11)
 *   jmp [rip + page+8-13]      ; the thunk
 *   int3 x3                    ; padding */
#define FFG_STUB_SIZE 16

static inline void ffg_write_stub(unsigned char *p, size_t page)
{
    int32_t to_target = (int32_t)(page - 7);
    int32_t to_thunk = (int32_t)(page + 8 - 13);
    p[0] = 0x4c, p[1] = 0x8b, p[2] = 0x1d;
    memcpy(p + 3, &to_target, 4);
    p[7] = 0xff, p[8] = 0x25;
    memcpy(p + 9, &to_thunk, 4);
    p[13] = p[14] = p[15] = 0xcc;
}

/* ---- the signal context: async-signal-safe (plain reads and writes of it) ---------- */

static inline uintptr_t ffg_uc_pc(const ucontext_t *uc) { return (uintptr_t)uc->uc_mcontext.gregs[REG_RIP]; }
static inline uintptr_t ffg_uc_sp(const ucontext_t *uc) { return (uintptr_t)uc->uc_mcontext.gregs[REG_RSP]; }

static inline void ffg_uc_regs(const ucontext_t *uc, uint64_t *out)
{
    memcpy(out, uc->uc_mcontext.gregs, FFG_NREGS * sizeof(uint64_t));
}

/* What the faulting access was, from the page-fault error code the kernel stores:
 * 0 unknown, 1 read, 2 write, 3 instruction fetch; *from_context: the context said. */
static inline int ffg_uc_access(const ucontext_t *uc, uintptr_t address, int *from_context)
{
    (void)address;
    *from_context = uc->uc_mcontext.gregs[REG_TRAPNO] == FFG_TRAP_PAGE_FAULT;
    if (!*from_context) /* not a page fault */
        return 0;
    greg_t err = uc->uc_mcontext.gregs[REG_ERR];
    if (err & 0x10)
        return 3;
    return (err & 0x2) ? 2 : 1;
}

/* Whether this thread sent itself the signal: it is delivered as the tgkill system call
 * that sent it returns (glibc's raise(), abort(), pthread_kill() of the thread itself),
 * so the instruction before pc is `syscall`, and the arguments, which the system call
 * leaves in rdi/rsi/rdx, name this process, this thread and this signal. A pthread_kill
 * from another thread carries the same siginfo but interrupts this one anywhere. */
#define FFG_SYSCALL_INSN_LEN 2 /* 0f 05 */

static inline int ffg_uc_self_sent(const ucontext_t *uc, int signo, pid_t pid, pid_t tid, size_t page)
{
    const greg_t *g = uc->uc_mcontext.gregs;
    uintptr_t pc = (uintptr_t)g[REG_RIP];
    if (pc % page < FFG_SYSCALL_INSN_LEN) /* the bytes before pc are on another page */
        return 0;
    const unsigned char *insn = (const unsigned char *)(pc - FFG_SYSCALL_INSN_LEN);
    return insn[0] == 0x0f && insn[1] == 0x05 && g[REG_RDI] == pid && g[REG_RSI] == tid &&
           g[REG_RDX] == signo;
}

/* ---- unwinding (unwind.c), in the signal handler: async-signal-safe -----------------
 * DWARF register numbers (System V psABI): 0 rax, 1 rdx, 2 rcx, 3 rbx, 4 rsi, 5 rdi,
 * 6 rbp, 7 rsp, 8-15 r8-r15, 16 the return address column (rip). */
#define FFG_UNW_NREGS 17
#define FFG_UNW_SP 7
#define FFG_UNW_RA 16

static inline void ffg_unw_regs_from_uc(const ucontext_t *uc, uintptr_t *r)
{
    static const int from[FFG_UNW_NREGS] = {REG_RAX, REG_RDX, REG_RCX, REG_RBX, REG_RSI, REG_RDI,
                                            REG_RBP, REG_RSP, REG_R8,  REG_R9,  REG_R10, REG_R11,
                                            REG_R12, REG_R13, REG_R14, REG_R15, REG_RIP};
    for (int i = 0; i < FFG_UNW_NREGS; i++)
        r[i] = (uintptr_t)uc->uc_mcontext.gregs[from[i]];
}

/* Return addresses are plain addresses here. */
static inline uintptr_t ffg_unw_strip_ra(uintptr_t ra) { return ra; }

/* A call to a bad address (e.g. through NULL), where nothing describes pc: the call
 * pushed the caller's return address on top of the stack. The caller's frame: that
 * address, rsp above it. 0 when rsp is outside [lo, hi). */
FFG_UNCHECKED_READ static inline int ffg_unw_bad_call(uintptr_t *r, uintptr_t pc, uintptr_t lo, uintptr_t hi,
                                                     uintptr_t *ret)
{
    uintptr_t sp = r[FFG_UNW_SP];
    (void)pc;
    if (sp < lo || sp > hi || hi - sp < sizeof(uintptr_t) || (sp % sizeof(uintptr_t)))
        return 0;
    *ret = *(const volatile uintptr_t *)sp;
    r[FFG_UNW_SP] = sp + sizeof(uintptr_t);
    r[FFG_UNW_RA] = *ret;
    return *ret != 0;
}

/* Make sigreturn resume at the thunk's return path as if the foreign function had
 * returned 0: stack and callee-saved registers from the frame, rbx = the frame (the
 * return path expects it there), flags and FPU control as the ABI promises at a
 * call boundary. Async-signal-safe: it only edits the saved context. */
static inline void ffg_uc_recover(ucontext_t *uc, const struct ffg_frame *frame, uintptr_t resume)
{
    greg_t *g = uc->uc_mcontext.gregs;
    g[REG_RIP] = (greg_t)resume;
    g[REG_RSP] = (greg_t)frame->sp;
    g[REG_RBX] = (greg_t)(uintptr_t)frame;
    g[REG_RBP] = (greg_t)frame->rbp;
    g[REG_R12] = (greg_t)frame->r12;
    g[REG_R13] = (greg_t)frame->r13;
    g[REG_R14] = (greg_t)frame->r14;
    g[REG_R15] = (greg_t)frame->r15;
    g[REG_RAX] = 0;
    g[REG_RDX] = 0;
    g[REG_EFL] &= ~(greg_t)0x400; /* DF: glibc's backward memmove may have left it set */
    struct _libc_fpstate *fp = uc->uc_mcontext.fpregs;
    if (fp) {
        fp->mxcsr = frame->mxcsr;
        fp->cwd = frame->fpucw;
        fp->swd = 0; /* x87 stack empty, no pending exceptions: as at any call boundary */
        fp->ftw = 0;
        memset(&fp->_xmm[0], 0, sizeof(struct _libc_xmmreg)); /* xmm0 = 0.0: a float result reads as 0 */
    }
}

/* ---- shield (issue 13): protection keys (PKRU) ---------------------------------------
 * RDPKRU/WRPKRU as bytes (assemblers before binutils 2.26 lack the mnemonics). Both are
 * single unprivileged instructions: async-signal-safe. They raise #UD unless the CPU has
 * PKU and the kernel enabled it (CR4.PKE): shield.c calls them only after pkey_alloc
 * succeeded. */
#define FFG_ARCH_HAS_PKEYS 1
#define FFG_PKRU_BITS_PER_KEY 2
#define FFG_PKRU_AD 1u /* access-disable bit of a key, shifted by 2 * key */
#define FFG_PKRU_WD 2u /* write-disable bit */

static inline uint32_t ffg_arch_rdpkru(void)
{
    uint32_t eax, edx;
    __asm__ volatile(".byte 0x0f, 0x01, 0xee" : "=a"(eax), "=d"(edx) : "c"(0));
    (void)edx;
    return eax;
}

static inline void ffg_arch_wrpkru(uint32_t value)
{
    __asm__ volatile(".byte 0x0f, 0x01, 0xef" : : "a"(value), "c"(0), "d"(0) : "memory");
}

/* The signal frame's FP state is an XSAVE area (PKU.md): the software-reserved bytes of
 * the legacy area carry FP_XSTATE_MAGIC1, the XSAVE header's XSTATE_BV says which
 * components it holds, and PKRU (component 9) sits at the offset CPUID(0xD, 9).EBX
 * gives (the standard, non-compacted format the kernel uses for signal frames). */
#define FFG_XSAVE_MAGIC1 0x46505853u
#define FFG_XSAVE_MAGIC1_OFFSET 464 /* fpx_sw_bytes.magic1 in the legacy area */
#define FFG_XSAVE_XFEATURES_OFFSET 472 /* fpx_sw_bytes.xfeatures: what the frame can hold */
#define FFG_XSAVE_XSTATE_BV_OFFSET 512
#define FFG_XSTATE_PKRU_COMPONENT 9
#define FFG_CPUID_XSTATE_LEAF 0xD

static inline uint32_t ffg_arch_pkru_xsave_offset(void) /* normal context, once */
{
    uint32_t a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d)
                     : "a"(FFG_CPUID_XSTATE_LEAF), "c"(FFG_XSTATE_PKRU_COMPONENT));
    return b;
}

/* The saved PKRU in a signal context, or NULL when the frame has none (async-signal-safe:
 * plain reads). Writing through the pointer sets what sigreturn installs; the caller must
 * also have called ffg_uc_mark_pkru so that XRSTOR loads it. */
static inline uint32_t *ffg_uc_pkru(ucontext_t *uc, uint32_t xsave_offset)
{
    unsigned char *x = (unsigned char *)uc->uc_mcontext.fpregs;
    uint32_t magic;
    uint64_t features;
    if (!x || !xsave_offset)
        return NULL;
    memcpy(&magic, x + FFG_XSAVE_MAGIC1_OFFSET, sizeof magic);
    memcpy(&features, x + FFG_XSAVE_XFEATURES_OFFSET, sizeof features);
    if (magic != FFG_XSAVE_MAGIC1 || !(features & ((uint64_t)1 << FFG_XSTATE_PKRU_COMPONENT)))
        return NULL;
    return (uint32_t *)(void *)(x + xsave_offset);
}

static inline void ffg_uc_mark_pkru(ucontext_t *uc)
{
    uint64_t *bv = (uint64_t *)(void *)((unsigned char *)uc->uc_mcontext.fpregs + FFG_XSAVE_XSTATE_BV_OFFSET);
    *bv |= (uint64_t)1 << FFG_XSTATE_PKRU_COMPONENT;
}
#endif /* __ASSEMBLER__ */
#endif
