/* Register probes for the tests (AArch64): what a caller sees in its callee-saved
 * registers after a guarded call into ffg_clobber_and_fault was recovered.
 *
 * int ffg_probe_callee_saved(void (*fn)(void), int *same)
 *   sets x19-x28 and d8-d15 to known values, calls fn (the guard stub of
 *   ffg_clobber_and_fault, armed by a GuardedFunction) with BLR, and stores in *same
 *   (and returns) 1 when all of them still hold those values afterwards, else 0.
 *   (x29, the frame pointer, is checked through the frame record it restores.)
 * void ffg_clobber_and_fault(void)
 *   zeroes x19-x29 and d8-d15 (against the ABI, on purpose) and reads address 0.
 */
    .text
    .globl  ffg_probe_callee_saved
    .type   ffg_probe_callee_saved, %function
    .p2align 4
ffg_probe_callee_saved:
    bti     c
    stp     x29, x30, [sp, #-176]!
    mov     x29, sp
    stp     x19, x20, [sp, #16]
    stp     x21, x22, [sp, #32]
    stp     x23, x24, [sp, #48]
    stp     x25, x26, [sp, #64]
    stp     x27, x28, [sp, #80]
    stp     d8, d9, [sp, #96]
    stp     d10, d11, [sp, #112]
    stp     d12, d13, [sp, #128]
    stp     d14, d15, [sp, #144]
    str     x1, [sp, #160]              /* `same` */
    mov     x19, #19
    mov     x20, #20
    mov     x21, #21
    mov     x22, #22
    mov     x23, #23
    mov     x24, #24
    mov     x25, #25
    mov     x26, #26
    mov     x27, #27
    mov     x28, #28
    fmov    d8, #8.0
    fmov    d9, #9.0
    fmov    d10, #10.0
    fmov    d11, #11.0
    fmov    d12, #12.0
    fmov    d13, #13.0
    fmov    d14, #14.0
    fmov    d15, #15.0
    mov     x9, x29                     /* the frame pointer the call must give back */
    str     x9, [sp, #168]
    blr     x0
    mov     w0, #0
    .irp n, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28
    cmp     x\n, #\n
    b.ne    1f
    .endr
    .irp n, 8, 9, 10, 11, 12, 13, 14, 15
    fmov    d0, #\n\().0
    fcmp    d\n, d0
    b.ne    1f
    .endr
    ldr     x9, [sp, #168]
    cmp     x9, x29
    b.ne    1f
    mov     x9, sp
    cmp     x9, x29                     /* sp back where it was */
    b.ne    1f
    mov     w0, #1
1:  ldr     x1, [sp, #160]
    str     w0, [x1]
    ldp     x19, x20, [sp, #16]
    ldp     x21, x22, [sp, #32]
    ldp     x23, x24, [sp, #48]
    ldp     x25, x26, [sp, #64]
    ldp     x27, x28, [sp, #80]
    ldp     d8, d9, [sp, #96]
    ldp     d10, d11, [sp, #112]
    ldp     d12, d13, [sp, #128]
    ldp     d14, d15, [sp, #144]
    ldp     x29, x30, [sp], #176
    ret
    .size   ffg_probe_callee_saved, . - ffg_probe_callee_saved

    .globl  ffg_clobber_and_fault
    .type   ffg_clobber_and_fault, %function
    .p2align 4
ffg_clobber_and_fault:
    bti     c
    .irp n, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29
    mov     x\n, #0
    .endr
    .irp n, 8, 9, 10, 11, 12, 13, 14, 15
    fmov    d\n, xzr
    .endr
    mov     x9, #0
    ldr     w0, [x9]                    /* SIGSEGV, address 0 */
    ret
    .size   ffg_clobber_and_fault, . - ffg_clobber_and_fault

    .section .note.GNU-stack,"",%progbits

/* GNU_PROPERTY_AARCH64_FEATURE_1_AND: BTI | PAC, as the rest of the library (without
 * this note the linker would unmark the whole library). */
    .section .note.gnu.property, "a"
    .p2align 3
    .word   4
    .word   16
    .word   5
    .asciz  "GNU"
    .word   0xc0000000
    .word   4
    .word   3
    .word   0
