/* x86-64 guard thunk. Every guarded function's stub loads the real target into r11
 * (no argument lives there) and jumps here.
 *
 * When the calling thread armed this call (its GuardedFunction set thread->armed to
 * this very target),
 * the thunk pops the caller's return address into a new frame on the thread's guard
 * stack, saves the stack pointer and callee-saved registers there, and *calls* the
 * target: the call pushes our return address into the very slot the caller's held,
 * so the target sees exactly the stack and registers the caller built (stack args,
 * varargs with %al, struct returns all pass through). On return it pops the frame
 * and returns to the caller. Calls and returns stay paired for the return predictor.
 *
 * When the call is not armed (the stub was reached some other way: a C caller, a
 * cast of the function pointer) it just jumps to the target: no guard, no cost.
 *
 * The signal handler recovers a faulting call by resuming at ffg_thunk_recover (the
 * same address as ffg_thunk_return) with
 * rsp, rbx (= the frame), rbp and r12-r15 taken from the frame: the same return path.
 *
 * The return path marks its frame dead (token 0) and pops it with any dead frames under
 * it. Normally the frame is the top one; when greenlets let calls finish out of order,
 * a frame with live ones above it stays (dead) until they return.
 */
#include "x86_64.h"

#define T_TOP 0
#define T_END 8
#define T_ARMED 16
#define T_TOKEN 24
#define T_HOST 32 /* struct ffg_host: ts, frame, depth */

    .text
    .globl  ffg_thunk
    .hidden ffg_thunk
    .type   ffg_thunk, @function
    .p2align 4
ffg_thunk:
    .cfi_startproc
    movq    ffg_tls@GOTTPOFF(%rip), %r10
    movq    %fs:(%r10), %r10            /* r10 = this thread's guard state, or NULL */
    testq   %r10, %r10
    jz      .Lunguarded
    cmpq    %r11, T_ARMED(%r10)         /* armed for exactly this target? */
    jne     .Lunguarded
    pushq   %rbx                        /* below the return address: ours to use */
    .cfi_adjust_cfa_offset 8
    .cfi_remember_state
    movq    T_TOP(%r10), %rbx           /* rbx = the new frame; the target preserves it */
    cmpq    T_END(%r10), %rbx
    jae     .Lfull
    movq    %r11, F_TARGET(%rbx)
    movq    T_TOKEN(%r10), %r11
    movq    %r11, F_TOKEN(%rbx)
    movq    T_HOST(%r10), %r11          /* where the interpreter stood at arming */
    movq    %r11, F_HOST(%rbx)
    movq    T_HOST+8(%r10), %r11
    movq    %r11, F_HOST+8(%rbx)
    movq    T_HOST+16(%r10), %r11
    movq    %r11, F_HOST+16(%rbx)
    movq    $0, T_ARMED(%r10)           /* nested calls must be armed anew */
    leaq    FRAME_SIZE(%rbx), %r11
    movq    %r11, T_TOP(%r10)
    popq    F_RBX(%rbx)
    popq    F_RET(%rbx)
    /* From here until the frame is popped, the caller's return address is in the
     * guard frame, not on the stack: tell unwinders the chain ends here. */
    .cfi_undefined rip
    movq    %rsp, F_SP(%rbx)
    movq    %rbp, F_RBP(%rbx)
    movq    %r12, F_R12(%rbx)
    movq    %r13, F_R13(%rbx)
    movq    %r14, F_R14(%rbx)
    movq    %r15, F_R15(%rbx)
    stmxcsr F_MXCSR(%rbx)
    fnstcw  F_FPUCW(%rbx)
    /* shield (issue 13): the one test the unshielded path pays */
    cmpq    $0, F_TOKEN(%rbx)           /* token's top bit: lock PKRU for this call */
    js      .Lshield_call
    call    *F_TARGET(%rbx)

    .globl  ffg_thunk_return
    .hidden ffg_thunk_return
    .globl  ffg_thunk_recover
    .hidden ffg_thunk_recover
ffg_thunk_return:                       /* rax/rdx/xmm0/xmm1/st0 hold the result */
ffg_thunk_recover:                      /* the handler resumes here too (same path) */
    movq    ffg_tls@GOTTPOFF(%rip), %r10
    movq    %fs:(%r10), %r10
    movq    $0, F_TOKEN(%rbx)           /* this call is over: its frame is dead */
    leaq    FRAME_SIZE(%rbx), %r11
    cmpq    %r11, T_TOP(%r10)
    jne     .Lpopped                    /* a live frame above (greenlets): it pops us later */
    movq    %rbx, %r11
.Lpop_dead:                             /* pop this frame and the dead ones under it */
    cmpq    $0, F_TOKEN-FRAME_SIZE(%r11)  /* frames[0] is a sentinel: never 0 */
    jne     .Lset_top
    subq    $FRAME_SIZE, %r11
    jmp     .Lpop_dead
.Lset_top:
    movq    %r11, T_TOP(%r10)
.Lpopped:
    movq    F_RET(%rbx), %r11
    movq    F_RBX(%rbx), %rbx
    pushq   %r11
    ret

    /* ---- shield (issue 13): a call with the host's memory locked by PKRU -------------
     * Save the caller's PKRU in the frame, write the locked value
     * (PKRU & ffg_shield_keep | ffg_shield_lockbits: ffiguard's keys write- or
     * access-disabled, every other key as the caller had it), call, and write the saved
     * PKRU back. RDPKRU/WRPKRU use eax, ecx (must be 0) and edx, which hold arguments
     * here (al: the varargs count; rcx, rdx: arguments): kept in r10, r11 (free: the
     * target is in the frame) and the frame. The handler resumes a faulted shielded call
     * at ffg_thunk_shield_recover: sigreturn has put back the locked fault-time PKRU,
     * and this same return path writes the caller's. Then the common return path. */
    .cfi_restore_state
    .cfi_remember_state
    .cfi_undefined rip
.Lshield_call:
    movq    %rax, F_SHIELD_RAX(%rbx)
    movq    %rcx, %r10
    movq    %rdx, %r11
    xorl    %ecx, %ecx
    .byte   0x0f, 0x01, 0xee            /* rdpkru: eax = PKRU (edx = 0) */
    movl    %eax, F_PKRU(%rbx)
    andl    ffg_shield_keep(%rip), %eax
    orl     ffg_shield_lockbits(%rip), %eax
    xorl    %edx, %edx
    .byte   0x0f, 0x01, 0xef            /* wrpkru: PKRU = eax (ecx = edx = 0) */
    movq    %r10, %rcx
    movq    %r11, %rdx
    movq    F_SHIELD_RAX(%rbx), %rax
    call    *F_TARGET(%rbx)

    .globl  ffg_thunk_shield_recover
    .hidden ffg_thunk_shield_recover
ffg_thunk_shield_recover:               /* rax/rdx/xmm0/xmm1/st0 hold the result */
    movq    %rax, %r10
    movq    %rdx, %r11
    movl    F_PKRU(%rbx), %eax
    xorl    %ecx, %ecx
    xorl    %edx, %edx
    .byte   0x0f, 0x01, 0xef            /* wrpkru: the caller's PKRU back */
    movq    %r10, %rax
    movq    %r11, %rdx
    jmp     ffg_thunk_return
    /* ---- end of shield ---------------------------------------------------------------- */

.Lfull:                                 /* guard stack exhausted: call unguarded. GuardedFunction
                                         * refuses a call when the stack is full, so this is
                                         * reached only when a guarded call made during
                                         * argument conversion filled it; the handler then
                                         * declines the fault (the interpreter has moved). */
    .cfi_restore_state
    popq    %rbx
    .cfi_adjust_cfa_offset -8
.Lunguarded:
    jmp     *%r11
    .cfi_endproc

    .globl  ffg_thunk_end
    .hidden ffg_thunk_end
ffg_thunk_end:
    .size   ffg_thunk, ffg_thunk_end - ffg_thunk

    .section .note.GNU-stack,"",@progbits
