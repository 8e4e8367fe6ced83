/*
 * void cs_round(const u64 *want, u64 *got, u64 spin, u64 avx)
 *
 * Loads every general register but rsp, xmm0-15 and (avx != 0) the upper halves of ymm0-15
 * from want[], spins `spin` iterations on a counter kept on the stack, and stores them all to
 * got[]. Layout of both arrays (u64 units): [0..15] GPRs by encoding (rax rcx rdx rbx rsp rbp
 * rsi rdi r8..r15; slot 4 unused), [16..47] xmm0-15 (2 each), [48..79] ymm0-15 bits 128..255.
 */
#define X(n) (128 + 16 * (n))
#define Y(n) (384 + 16 * (n))

        .text
        .code64
        .globl cs_round
cs_round:
        pushq %rbx
        pushq %rbp
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        pushq %rsi                      /* got */
        pushq %rcx                      /* avx */
        pushq %rdx                      /* spin counter */

        /* VEX instructions only on registers: some hypervisors emulate guest memory accesses
         * with an instruction emulator that knows SSE moves but not AVX. */
        testq %rcx, %rcx
        jz 1f
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        movdqu Y(\n)(%rdi), %xmm\n
        vinsertf128 $1, %xmm\n, %ymm\n, %ymm\n
        .endr
1:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        movdqu X(\n)(%rdi), %xmm\n       /* legacy SSE: keeps bits 128..255 */
        .endr
        movq 0(%rdi), %rax
        movq 8(%rdi), %rcx
        movq 16(%rdi), %rdx
        movq 24(%rdi), %rbx
        movq 40(%rdi), %rbp
        movq 48(%rdi), %rsi
        movq 64(%rdi), %r8
        movq 72(%rdi), %r9
        movq 80(%rdi), %r10
        movq 88(%rdi), %r11
        movq 96(%rdi), %r12
        movq 104(%rdi), %r13
        movq 112(%rdi), %r14
        movq 120(%rdi), %r15
        movq 56(%rdi), %rdi

2:      decq (%rsp)                     /* only flags and memory change while spinning */
        jnz 2b

        pushq %rdi                      /* stack: rdi, spin, avx, got */
        movq 24(%rsp), %rdi
        movq %rax, 0(%rdi)
        movq %rcx, 8(%rdi)
        movq %rdx, 16(%rdi)
        movq %rbx, 24(%rdi)
        movq %rbp, 40(%rdi)
        movq %rsi, 48(%rdi)
        movq %r8, 64(%rdi)
        movq %r9, 72(%rdi)
        movq %r10, 80(%rdi)
        movq %r11, 88(%rdi)
        movq %r12, 96(%rdi)
        movq %r13, 104(%rdi)
        movq %r14, 112(%rdi)
        movq %r15, 120(%rdi)
        popq %rax
        movq %rax, 56(%rdi)
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        movdqu %xmm\n, X(\n)(%rdi)
        .endr
        cmpq $0, 8(%rsp)
        jz 3f
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        vextractf128 $1, %ymm\n, %xmm\n
        movdqu %xmm\n, Y(\n)(%rdi)
        .endr
        vzeroupper
3:      addq $24, %rsp
        popq %r15
        popq %r14
        popq %r13
        popq %r12
        popq %rbp
        popq %rbx
        ret
