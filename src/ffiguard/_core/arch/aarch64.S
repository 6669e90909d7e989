/* AArch64 guard thunk (AAPCS64). Every guarded function's stub loads the real target
 * into x16 and the thunk's address into x17 and branches here with `br x17`.
 *
 * When the calling thread armed this call (its GuardedFunction set thread->armed to
 * this very target), the thunk pushes a frame on the thread's guard stack holding the
 * caller's return address (x30), sp, x19-x29, d8-d15 and FPCR, and *calls* the target
 * with `blr x16`: x0-x8, v0-v7 and the stack are untouched, so the target sees exactly
 * the arguments the caller built (stack arguments, HFAs, x8's indirect result, varargs).
 * On return it pops the frame, restores x30 and x19 and returns with `ret`: BLR and RET
 * stay paired for the return predictor.
 *
 * When the call is not armed (a C caller, a cast of the function pointer) it branches to
 * the target with `br x16`: no guard, no cost; BR through x16 is accepted by the
 * target's `bti c` landing pad.
 *
 * The return path marks its frame dead (token 0) and pops it with any dead frames under
 * it; with greenlets a frame can finish under a live one, and stays until that returns.
 *
 * The signal handler recovers a faulting call by resuming at ffg_thunk_recover with sp,
 * x19 (= the frame) and x20-x29 taken from the frame; that path reloads d8-d15 and
 * FPCR, zeroes v0-v3 and joins the normal return path.
 *
 * Scratch: x9-x15 and x17 (caller-saved, and no argument lives there). The thread state
 * is read through initial-exec TLS (adrp/ldr :gottprel:, then tpidr_el0): local-exec
 * offsets are wrong in a dlopened library.
 *
 * BTI and PAC: `bti c` is the entry's landing pad; PACIASP/AUTIASP sign the return
 * address while it sits in the guard frame (both are hints: NOPs on CPUs without
 * PAC/BTI). The GNU property note at the end says so; without it the linker would turn
 * BTI off for the whole extension.
 */
#include "aarch64.h"

#define T_TOP 0
#define T_END 8
#define T_ARMED 16
#define T_TOKEN 24
#define T_HOST 32 /* struct ffg_host: ts, frame, depth */

/* x = this thread's guard state (ffg_tls), or 0; clobbers tmp */
.macro thread_state x, tmp
    adrp    \x, :gottprel:ffg_tls
    ldr     \x, [\x, #:gottprel_lo12:ffg_tls]
    mrs     \tmp, tpidr_el0
    ldr     \x, [\tmp, \x]
.endm

    .text
    .globl  ffg_thunk
    .hidden ffg_thunk
    .type   ffg_thunk, %function
    .p2align 4
ffg_thunk:
    .cfi_startproc
    bti     c
    thread_state x9, x10
    cbz     x9, .Lunguarded
    ldp     x12, x13, [x9, #T_ARMED]    /* x12 = armed target, x13 = its token */
    cmp     x12, x16                    /* armed for exactly this target? */
    b.ne    .Lunguarded
    ldp     x10, x11, [x9, #T_TOP]      /* x10 = the new frame, x11 = the end */
    cmp     x10, x11
    b.hs    .Lunguarded                 /* guard stack exhausted: call unguarded (reached
                                         * only when a guarded call made during argument
                                         * conversion filled it: GuardedFunction refuses a
                                         * call when the stack is full) */
    .cfi_remember_state                 /* the unguarded exit's view: x30 = the return */
    paciasp                             /* sign x30 (modifier: sp, unchanged until ret) */
    .cfi_window_save                    /* = .cfi_negate_ra_state */
    add     x11, x10, #FRAME_SIZE
    str     x11, [x9, #T_TOP]
    str     xzr, [x9, #T_ARMED]         /* nested calls must be armed anew */
    mov     x11, sp
    mrs     x12, fpcr
    stp     x30, x19, [x10, #F_LR]
    stp     x20, x21, [x10, #F_X20]
    stp     x22, x23, [x10, #F_X22]
    stp     x24, x25, [x10, #F_X24]
    stp     x26, x27, [x10, #F_X26]
    stp     x28, x29, [x10, #F_X28]
    stp     x11, x16, [x10, #F_SP]      /* sp, target */
    stp     x13, x12, [x10, #F_TOKEN]   /* token, fpcr */
    ldp     x14, x15, [x9, #T_HOST]     /* where the interpreter stood at arming */
    ldr     x17, [x9, #T_HOST + 16]
    stp     x14, x15, [x10, #F_HOST]
    str     x17, [x10, #F_HOST + 16]
    stp     d8, d9, [x10, #F_D8]
    stp     d10, d11, [x10, #F_D10]
    stp     d12, d13, [x10, #F_D12]
    stp     d14, d15, [x10, #F_D14]
    mov     x19, x10                    /* x19 = the frame; the target preserves it */
    /* From here until the frame is popped, the caller's return address is in the guard
     * frame, not in x30: tell unwinders the chain ends here. */
    .cfi_undefined x30
    blr     x16

    .globl  ffg_thunk_return
    .hidden ffg_thunk_return
ffg_thunk_return:                       /* x0-x7 / v0-v3 / x8's memory hold the result */
    thread_state x9, x10
    str     xzr, [x19, #F_TOKEN]        /* this call is over: its frame is dead */
    ldr     x11, [x9, #T_TOP]
    add     x12, x19, #FRAME_SIZE
    cmp     x11, x12
    b.ne    .Lpopped                    /* a live frame above (greenlets): it pops us later */
    mov     x11, x19
.Lpop_dead:                             /* pop this frame and the dead ones under it */
    ldur    x12, [x11, #(F_TOKEN - FRAME_SIZE)]  /* frames[0] is a sentinel: never 0 */
    cbnz    x12, .Lset_top
    sub     x11, x11, #FRAME_SIZE
    b       .Lpop_dead
.Lset_top:
    str     x11, [x9, #T_TOP]
.Lpopped:
    ldp     x30, x19, [x19, #F_LR]
    autiasp
    ret

    .globl  ffg_thunk_recover
    .hidden ffg_thunk_recover
ffg_thunk_recover:                      /* the signal handler resumes here after a fault */
    ldp     d8, d9, [x19, #F_D8]
    ldp     d10, d11, [x19, #F_D10]
    ldp     d12, d13, [x19, #F_D12]
    ldp     d14, d15, [x19, #F_D14]
    ldr     x9, [x19, #F_FPCR]
    msr     fpcr, x9
    movi    v0.2d, #0                   /* a float/HFA result reads as 0 */
    movi    v1.2d, #0
    movi    v2.2d, #0
    movi    v3.2d, #0
    b       ffg_thunk_return

.Lunguarded:
    .cfi_restore_state
    br      x16
    .cfi_endproc

    .globl  ffg_thunk_end
    .hidden ffg_thunk_end
ffg_thunk_end:
    .size   ffg_thunk, ffg_thunk_end - ffg_thunk

    .section .note.GNU-stack,"",%progbits

/* GNU_PROPERTY_AARCH64_FEATURE_1_AND: BTI (1) | PAC (2). The linker ANDs these over all
 * input objects, so the extension is BTI/PAC-marked exactly when the C files are built
 * with -mbranch-protection too (setup.py does that on AArch64). */
    .section .note.gnu.property, "a"
    .p2align 3
    .word   4                           /* name size ("GNU\0") */
    .word   16                          /* descriptor size */
    .word   5                           /* NT_GNU_PROPERTY_TYPE_0 */
    .asciz  "GNU"
    .word   0xc0000000                  /* GNU_PROPERTY_AARCH64_FEATURE_1_AND */
    .word   4                           /* data size */
    .word   3                           /* BTI | PAC */
    .word   0                           /* pad to 8 */
