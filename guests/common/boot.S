/*
 * Multiboot v1 entry (32-bit), long-mode switch, AP trampoline, interrupt stubs.
 *
 * Page tables: identity map of the first NPD GiB with 2 MiB pages; 3-4 GiB (LAPIC, IOAPIC,
 * MMIO hole) is mapped uncached.  All CPUs share the tables, the GDT and the IDT.
 */
#include "layout.h"

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003     /* page-align modules, want memory info */

        .section .multiboot, "a"
        .balign 4
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

/* ------------------------------------------------------------------------------------------ */
        .section .text.boot, "ax"
        .code32
        .globl _start
_start:
        cli
        cld
        movl %eax, %esi                 /* multiboot magic */
        movl %ebx, %ebp                 /* multiboot info */
        lgdt gdt_ptr                    /* the loader's GDT may not exist */
        ljmp $SEL_CODE32, $1f
1:      movw $SEL_DATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        /* clear .bss (page tables and stacks live there) */
        movl $__bss_start, %edi
        movl $__bss_end, %ecx
        subl %edi, %ecx
        xorl %eax, %eax
        rep stosb
        movl %esi, mb_magic
        movl %ebp, mb_info
        /* PML4[0] -> PDPT; PDPT[i] -> PD i */
        movl $pdpt, %eax
        orl $3, %eax
        movl %eax, pml4
        xorl %ecx, %ecx
2:      movl %ecx, %eax
        shll $12, %eax
        addl $pds, %eax
        orl $3, %eax
        movl %eax, pdpt(,%ecx,8)
        incl %ecx
        cmpl $NPD, %ecx
        jb 2b
        /* PD entries for the first 4 GiB (C maps the rest of RAM): 2 MiB pages, present |
         * writable | PS; 3..4 GiB uncached */
        xorl %ecx, %ecx
3:      movl %ecx, %eax
        shll $21, %eax
        orl $0x83, %eax
        movl %ecx, %edx
        shrl $11, %edx
        cmpl $1536, %ecx
        jb 4f
        cmpl $2048, %ecx
        jae 4f
        orl $0x18, %eax                 /* PWT | PCD */
4:      movl %eax, pds(,%ecx,8)
        movl %edx, pds+4(,%ecx,8)
        incl %ecx
        cmpl $(4 * 512), %ecx
        jb 3b
        ENTER_LONG bsp_long

/* APs arrive here from the real-mode trampoline, in flat 32-bit protected mode. */
        .globl ap_entry32
ap_entry32:
        movw $SEL_DATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        ENTER_LONG ap_long

        .code64
bsp_long:
        movw $SEL_DATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        movq $boot_stack_top, %rsp
        xorl %ebp, %ebp
        call kmain
        jmp halt_forever

ap_long:
        movw $SEL_DATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        movl $1, %eax
        lock xaddl %eax, ap_next        /* this AP's index: 1, 2, ... */
        cmpl $MAXCPU, %eax
        jae halt_forever
        movl %eax, %edi
        incl %eax
        shlq $AP_STACK_SHIFT, %rax
        leaq ap_stacks(%rax), %rsp
        xorl %ebp, %ebp
        call ap_main
        .globl halt_forever
halt_forever:
        cli
        hlt
        jmp halt_forever

/* ------------------------------------------------------------------------------------------ */
/* Real-mode AP trampoline: copied to TRAMP_BASE, entered by SIPI vector TRAMP_BASE >> 12. */
        .code16
        .globl tramp_start, tramp_end
tramp_start:
        cli
        cld
        movw %cs, %ax
        movw %ax, %ds
        lgdtl tramp_gdtr - tramp_start
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        ljmpl $SEL_CODE32, $ap_entry32
        .balign 8
tramp_gdtr:
        .word gdt_end - gdt - 1
        .long gdt
tramp_end:

/* ------------------------------------------------------------------------------------------ */
/* Interrupt stubs: 256 of them, 16 bytes apart, starting at isr_table. */
        .code64
.macro ISR n
        .balign 16
        .if (\n == 8 || (\n >= 10 && \n <= 14) || \n == 17 || \n == 21 || \n == 29 || \n == 30)
        .else
        pushq $0
        .endif
        pushq $\n
        jmp isr_common
.endm
        .altmacro
        .balign 16
        .globl isr_table
isr_table:
        .set i, 0
        .rept 256
        ISR %i
        .set i, i + 1
        .endr
        .noaltmacro

isr_common:
        pushq %rax
        pushq %rcx
        pushq %rdx
        pushq %rbx
        pushq %rbp
        pushq %rsi
        pushq %rdi
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        cld
        movq %rsp, %rdi
        movq %rsp, %rbx
        andq $-16, %rsp
        call isr_dispatch
        movq %rbx, %rsp
        popq %r15
        popq %r14
        popq %r13
        popq %r12
        popq %r11
        popq %r10
        popq %r9
        popq %r8
        popq %rdi
        popq %rsi
        popq %rbp
        popq %rbx
        popq %rdx
        popq %rcx
        popq %rax
        addq $16, %rsp
        iretq

/* ------------------------------------------------------------------------------------------ */
        .section .data
        .balign 16
        .globl gdt
gdt:
        .quad 0
        .quad 0x00CF9B000000FFFF        /* 0x08: 32-bit code */
        .quad 0x00CF93000000FFFF        /* 0x10: data */
        .quad 0x00AF9B000000FFFF        /* 0x18: 64-bit code */
gdt_end:
        .balign 8
        .word 0
gdt_ptr:
        .word gdt_end - gdt - 1
        .long gdt
        .long 0

        .balign 4
        .globl ap_next
ap_next:
        .long 1
        .globl mb_magic, mb_info
mb_magic:
        .long 0
mb_info:
        .long 0

        .section .bss
        .balign 4096
        .globl pml4, pds
pml4:   .skip 4096
pdpt:   .skip 4096
pds:    .skip 4096 * NPD
boot_stack:
        .skip BOOT_STACK
boot_stack_top:
        .globl ap_stacks
ap_stacks:
        .skip (MAXCPU + 1) << AP_STACK_SHIFT
