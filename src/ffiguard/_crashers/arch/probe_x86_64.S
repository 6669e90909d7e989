/* Register probes for the tests (x86-64): what a caller sees in its callee-saved
 * registers after a guarded call into ffg_clobber_and_fault was recovered.
 *
 * int ffg_probe_callee_saved(void (*fn)(void), int *same)
 *   sets rbx, rbp and r12-r15 to known values, calls fn (the guard stub of
 *   ffg_clobber_and_fault, armed by a GuardedFunction), and stores in *same (and
 *   returns) 1 when all six still hold those values afterwards, else 0.
 * void ffg_clobber_and_fault(void)
 *   zeroes rbx, rbp and r12-r15 (against the ABI, on purpose) and reads address 0.
 */
#define PROBE_RBX 0x1111111111111111
#define PROBE_RBP 0x2222222222222222
#define PROBE_R12 0x3333333333333333
#define PROBE_R13 0x4444444444444444
#define PROBE_R14 0x5555555555555555
#define PROBE_R15 0x6666666666666666

.macro expect reg, value
    movabsq $\value, %rcx
    cmpq    %rcx, \reg
    jne     1f
.endm

    .text
    .globl  ffg_probe_callee_saved
    .type   ffg_probe_callee_saved, @function
    .p2align 4
ffg_probe_callee_saved:
    pushq   %rbx
    pushq   %rbp
    pushq   %r12
    pushq   %r13
    pushq   %r14
    pushq   %r15
    pushq   %rsi                        /* `same`; rsp is 16-byte aligned again */
    movabsq $PROBE_RBX, %rbx
    movabsq $PROBE_RBP, %rbp
    movabsq $PROBE_R12, %r12
    movabsq $PROBE_R13, %r13
    movabsq $PROBE_R14, %r14
    movabsq $PROBE_R15, %r15
    call    *%rdi
    xorl    %eax, %eax
    expect  %rbx, PROBE_RBX
    expect  %rbp, PROBE_RBP
    expect  %r12, PROBE_R12
    expect  %r13, PROBE_R13
    expect  %r14, PROBE_R14
    expect  %r15, PROBE_R15
    movl    $1, %eax
1:  popq    %rsi
    movl    %eax, (%rsi)
    popq    %r15
    popq    %r14
    popq    %r13
    popq    %r12
    popq    %rbp
    popq    %rbx
    ret
    .size   ffg_probe_callee_saved, . - ffg_probe_callee_saved

    .globl  ffg_clobber_and_fault
    .type   ffg_clobber_and_fault, @function
    .p2align 4
ffg_clobber_and_fault:
    xorl    %ebx, %ebx
    xorl    %ebp, %ebp
    xorl    %r12d, %r12d
    xorl    %r13d, %r13d
    xorl    %r14d, %r14d
    xorl    %r15d, %r15d
    movl    0, %eax                     /* SIGSEGV, address 0 */
    ret
    .size   ffg_clobber_and_fault, . - ffg_clobber_and_fault

    .section .note.GNU-stack,"",@progbits
