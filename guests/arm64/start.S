/* Boot code for livemig AArch64 guests (EL1, identity-mapped MMU, own exception vectors).
 * Entry: x0 = cmdline (guest-physical, NUL-terminated), x1 = RAM size,
 *        x2 = this CPU's index, x3 = number of CPUs started.  All CPUs enter here. */
#define STACK_SHIFT 14

    .section .text.boot, "ax"
    .global _start
_start:
    mov     x19, x0
    mov     x20, x1
    mov     x21, x2
    mov     x22, x3
    cmp     x21, #8
    b.hs    park                       /* at most 8 CPUs have a stack */
    adrp    x4, stacks
    add     x4, x4, :lo12:stacks
    add     x5, x21, #1
    lsl     x5, x5, #STACK_SHIFT
    add     sp, x4, x5
    adrp    x4, vectors
    add     x4, x4, :lo12:vectors
    msr     vbar_el1, x4
    mov     x4, #(3 << 20)             /* CPACR_EL1.FPEN: no FP/SIMD traps */
    msr     cpacr_el1, x4
    isb
    adrp    x4, pgtable
    add     x4, x4, :lo12:pgtable
    msr     ttbr0_el1, x4
    msr     ttbr1_el1, x4
    ldr     x4, =0xff00                /* attr0 device nGnRnE, attr1 normal WB */
    msr     mair_el1, x4
    ldr     x4, =0x1b5193519           /* see TCR_VALUE in guest.h */
    msr     tcr_el1, x4
    isb
    mrs     x4, sctlr_el1
    ldr     x5, =0x1005                /* M | C | I */
    orr     x4, x4, x5
    msr     sctlr_el1, x4
    isb
    mov     x0, x19
    mov     x1, x20
    mov     x2, x21
    mov     x3, x22
    bl      guest_main
park:
    b       park

/* Exception vectors: every entry saves the interrupted context (X0-X30, ELR, SPSR) and calls
 * exception_entry(vector number 0-15, frame) in lib.c, then restores it and returns with ERET.
 * Frame (u64 index): 0-30 X0-X30, 31 ELR_EL1, 32 SPSR_EL1; 34 words, 272 bytes. */
    .macro  vent n
    .balign 128
    stp     x0, x1, [sp, #-272]!
    mov     x0, #\n
    b       exc_common
    .endm

    .balign 2048
vectors:
    vent 0
    vent 1
    vent 2
    vent 3
    vent 4
    vent 5
    vent 6
    vent 7
    vent 8
    vent 9
    vent 10
    vent 11
    vent 12
    vent 13
    vent 14
    vent 15

exc_common:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    mrs     x2, elr_el1
    mrs     x3, spsr_el1
    stp     x30, x2, [sp, #240]
    str     x3, [sp, #256]
    mov     x1, sp
    bl      exception_entry
    ldr     x3, [sp, #256]
    ldp     x30, x2, [sp, #240]
    msr     elr_el1, x2
    msr     spsr_el1, x3
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    ldp     x0, x1, [sp], #272
    eret

    .section .data
    .balign 4096
    .global pgtable
/* Level-1 table, 1 GiB blocks, VA == PA: 0-1 GiB device (UART, probe), 1-5 GiB normal RAM. */
pgtable:
    .quad   0x0060000000000401         /* UXN|PXN|AF|attr0|block */
    .quad   0x0000000040000705         /* AF|SH inner|attr1|block */
    .quad   0x0000000080000705
    .quad   0x00000000c0000705
    .quad   0x0000000100000705
    .fill   507, 8, 0

    .section .bss
    .balign 16
    .global stacks
stacks:
    .space  (8 << STACK_SHIFT)
