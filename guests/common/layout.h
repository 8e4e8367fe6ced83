/* Constants shared by boot.S and the C runtime. */
#ifndef LAYOUT_H
#define LAYOUT_H

#define MAXCPU          8
#define NPD             64              /* GiB identity-mapped */
#define TRAMP_BASE      0x8000          /* AP real-mode trampoline; SIPI vector 0x08 */
#define BOOT_STACK      16384
#define AP_STACK_SHIFT  14              /* 16 KiB per AP */
#define SEL_CODE32      0x08
#define SEL_DATA        0x10
#define SEL_CODE64      0x18

#ifdef __ASSEMBLER__
/* From 32-bit protected mode (paging off) to 64-bit code at \target. */
.macro ENTER_LONG target
        movl %cr4, %eax
        orl $0x20, %eax                 /* PAE */
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $0xC0000080, %ecx          /* EFER.LME */
        rdmsr
        orl $0x100, %eax
        wrmsr
        movl %cr0, %eax
        andl $0x9FFFFFFF, %eax          /* caches on (CD, NW clear after INIT) */
        orl $0x80000001, %eax           /* PG | PE */
        movl %eax, %cr0
        ljmp $SEL_CODE64, $\target
.endm
#endif

#endif
