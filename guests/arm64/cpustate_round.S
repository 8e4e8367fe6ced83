/* void cpustate_round(const u64 *in, u64 *out)
 * (x4 / x30 point 512 bytes into the buffers so that LDP/STP offsets fit.)
 * in/out layout (u64 index): 0-63 V0-V31 (lo, hi), 64-94 X0-X30, 95 spins (in only),
 * 96-110 system registers (see cpustate.c).  Loads everything, spins twice (X29 is the counter
 * while X30 holds its value, then X30 counts while X29 holds its value), stores it all back. */
    .text
    .global cpustate_round
cpustate_round:
    sub     sp, sp, #192
    stp     x19, x20, [sp, #0]
    stp     x21, x22, [sp, #16]
    stp     x23, x24, [sp, #32]
    stp     x25, x26, [sp, #48]
    stp     x27, x28, [sp, #64]
    stp     x29, x30, [sp, #80]
    stp     d8, d9, [sp, #96]
    stp     d10, d11, [sp, #112]
    stp     d12, d13, [sp, #128]
    stp     d14, d15, [sp, #144]
    str     x1, [sp, #160]
    add     x4, x0, #512
    ldr     x2, [x4, #232]
    str     x2, [sp, #168]
    ldr     x2, [x4, #248]
    str     x2, [sp, #176]
    ldp     x2, x3, [x4, #256]
    msr     tpidr_el0, x2
    msr     tpidrro_el0, x3
    ldp     x2, x3, [x4, #272]
    msr     tpidr_el1, x2
    msr     contextidr_el1, x3
    ldp     x2, x3, [x4, #288]
    msr     far_el1, x2
    msr     esr_el1, x3
    ldp     x2, x3, [x4, #304]
    msr     par_el1, x2
    msr     elr_el1, x3
    ldp     x2, x3, [x4, #320]
    msr     spsr_el1, x2
    msr     sp_el0, x3
    ldp     x2, x3, [x4, #336]
    msr     amair_el1, x2
    msr     cntkctl_el1, x3
    ldp     x2, x3, [x4, #352]
    msr     fpcr, x2
    msr     fpsr, x3
    mov     x2, x0
    ld1     {v0.2d, v1.2d, v2.2d, v3.2d}, [x2], #64
    ld1     {v4.2d, v5.2d, v6.2d, v7.2d}, [x2], #64
    ld1     {v8.2d, v9.2d, v10.2d, v11.2d}, [x2], #64
    ld1     {v12.2d, v13.2d, v14.2d, v15.2d}, [x2], #64
    ld1     {v16.2d, v17.2d, v18.2d, v19.2d}, [x2], #64
    ld1     {v20.2d, v21.2d, v22.2d, v23.2d}, [x2], #64
    ld1     {v24.2d, v25.2d, v26.2d, v27.2d}, [x2], #64
    ld1     {v28.2d, v29.2d, v30.2d, v31.2d}, [x2], #64
    ldr     x2, [x4, #368]
    msr     nzcv, x2
    add     x30, x0, #512
    ldp     x0, x1, [x30, #0]
    ldp     x2, x3, [x30, #16]
    ldp     x4, x5, [x30, #32]
    ldp     x6, x7, [x30, #48]
    ldp     x8, x9, [x30, #64]
    ldp     x10, x11, [x30, #80]
    ldp     x12, x13, [x30, #96]
    ldp     x14, x15, [x30, #112]
    ldp     x16, x17, [x30, #128]
    ldp     x18, x19, [x30, #144]
    ldp     x20, x21, [x30, #160]
    ldp     x22, x23, [x30, #176]
    ldp     x24, x25, [x30, #192]
    ldp     x26, x27, [x30, #208]
    ldr     x28, [x30, #224]
    ldr     x29, [sp, #176]
    ldr     x30, [x30, #240]
1:  sub     x29, x29, #1
    cbnz    x29, 1b
    str     x30, [sp, #184]
    ldr     x30, [sp, #176]
    ldr     x29, [sp, #168]
2:  sub     x30, x30, #1
    cbnz    x30, 2b
    ldr     x30, [sp, #160]
    add     x30, x30, #512
    stp     x0, x1, [x30, #0]
    mrs     x0, nzcv
    str     x0, [x30, #368]
    stp     x2, x3, [x30, #16]
    stp     x4, x5, [x30, #32]
    stp     x6, x7, [x30, #48]
    stp     x8, x9, [x30, #64]
    stp     x10, x11, [x30, #80]
    stp     x12, x13, [x30, #96]
    stp     x14, x15, [x30, #112]
    stp     x16, x17, [x30, #128]
    stp     x18, x19, [x30, #144]
    stp     x20, x21, [x30, #160]
    stp     x22, x23, [x30, #176]
    stp     x24, x25, [x30, #192]
    stp     x26, x27, [x30, #208]
    stp     x28, x29, [x30, #224]
    ldr     x0, [sp, #184]
    str     x0, [x30, #240]
    sub     x2, x30, #512
    st1     {v0.2d, v1.2d, v2.2d, v3.2d}, [x2], #64
    st1     {v4.2d, v5.2d, v6.2d, v7.2d}, [x2], #64
    st1     {v8.2d, v9.2d, v10.2d, v11.2d}, [x2], #64
    st1     {v12.2d, v13.2d, v14.2d, v15.2d}, [x2], #64
    st1     {v16.2d, v17.2d, v18.2d, v19.2d}, [x2], #64
    st1     {v20.2d, v21.2d, v22.2d, v23.2d}, [x2], #64
    st1     {v24.2d, v25.2d, v26.2d, v27.2d}, [x2], #64
    st1     {v28.2d, v29.2d, v30.2d, v31.2d}, [x2], #64
    mrs     x2, tpidr_el0
    mrs     x3, tpidrro_el0
    stp     x2, x3, [x30, #256]
    mrs     x2, tpidr_el1
    mrs     x3, contextidr_el1
    stp     x2, x3, [x30, #272]
    mrs     x2, far_el1
    mrs     x3, esr_el1
    stp     x2, x3, [x30, #288]
    mrs     x2, par_el1
    mrs     x3, elr_el1
    stp     x2, x3, [x30, #304]
    mrs     x2, spsr_el1
    mrs     x3, sp_el0
    stp     x2, x3, [x30, #320]
    mrs     x2, amair_el1
    mrs     x3, cntkctl_el1
    stp     x2, x3, [x30, #336]
    mrs     x2, fpcr
    mrs     x3, fpsr
    stp     x2, x3, [x30, #352]
    ldp     x19, x20, [sp, #0]
    ldp     x21, x22, [sp, #16]
    ldp     x23, x24, [sp, #32]
    ldp     x25, x26, [sp, #48]
    ldp     x27, x28, [sp, #64]
    ldp     x29, x30, [sp, #80]
    ldp     d8, d9, [sp, #96]
    ldp     d10, d11, [sp, #112]
    ldp     d12, d13, [sp, #128]
    ldp     d14, d15, [sp, #144]
    add     sp, sp, #192
    ret
