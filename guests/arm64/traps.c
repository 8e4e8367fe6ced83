/* traps: on CPU 0, once per timer tick (tick= ms, default 100) takes an SVC, a load and a store
 * that reach no device (synchronous external aborts), an undefined instruction and a BRK, and
 * one PL011 transmit interrupt (SPI 33); it checks what its vectors saw against the
 * architecture (ESR_EL1 class and ISS, ELR_EL1, FAR_EL1) and reports each round:
 * OK value = round, aux = the SVC's ESR, with a console line of every ESR/FAR; heartbeat per
 * tick. FAIL value = which trap (1 svc, 2 load abort, 3 store abort, 4 undefined, 5 brk,
 * 6 uart interrupt), aux = the ESR seen. */
#include "guest.h"

#define NOWHERE 0x0B000000UL  /* inside the device GiB of the page table, no device there */

static volatile u64 seen_esr, seen_far, seen_elr, taken, uart_irqs, ticks_taken;
static u64 period, deadline;

static void on_sync(u32 cpu, u64 esr, u64 far, u64 *frame)
{
    (void)cpu;
    seen_esr = esr;
    seen_far = far;
    seen_elr = frame[31];
    taken++;
    if ((esr >> 26) != 0x15)  /* SVC returns after itself; the others skip the instruction */
        frame[31] += 4;
}

static void on_timer(u32 cpu, u32 id, u32 src)
{
    (void)cpu; (void)id; (void)src;
    deadline += period;
    if (deadline <= ticks()) deadline = ticks() + period;
    timer_set(deadline);
    ticks_taken++;
}

static void on_uart(u32 cpu, u32 id, u32 src)
{
    (void)cpu; (void)id; (void)src;
    uart_irqs++;
    uart_txim(0);  /* a driver whose queue is empty: no more transmit interrupts */
    uart_clear_tx();
}

static int check(u64 esr_want, u64 esr_mask, u64 elr, u64 far, int far_valid, u64 before)
{
    return taken == before + 1 && (seen_esr & esr_mask) == esr_want && seen_elr == elr
           && (!far_valid || seen_far == far);
}

void workload(const char *cmdline, u64 ram_size, u32 cpu, u32 ncpus)
{
    u64 reported = 0, round = 0;
    char line[160];
    (void)ram_size; (void)ncpus;
    if (cpu != 0)
        for (;;) wfi();
    period = param(cmdline, "tick=", 100) * tick_freq() / 1000;
    if (!period) period = 1;
    sync_handler = on_sync;
    gic_init_cpu(cpu);
    irq_on(PPI_CNTV, cpu, 0, on_timer);
    irq_on(SPI_UART, cpu, 0, on_uart);
    report(cpu, BOOT, W_TRAPS, 1, "traps", 0);
    deadline = ticks() + period;
    timer_set(deadline);
    __asm__ volatile("msr cntv_ctl_el0, %0; isb" :: "r"(1UL));
    irq_enable();
    for (;;) {
        wfi();
        if (ticks_taken == reported) continue;
        reported = ticks_taken;
        report(cpu, HEARTBEAT, reported, taken, "traps", 0);
        u64 at, val = 0, before, esr[5], far[5];
        int which = 0;

        before = taken;
        __asm__ volatile("adr %0, 1f; svc #0x1234; 1:" : "=r"(at) :: "memory");
        if (!check(0x56001234, ~0UL, at, 0, 0, before)) which = 1;
        esr[0] = seen_esr; far[0] = 0;

        before = taken;
        __asm__ volatile("adr %0, 1f; 1: ldr %1, [%2]" : "=&r"(at), "=r"(val) : "r"(NOWHERE) : "memory");
        if (!which && !check(0x96000010, 0xFE00007FUL, at, NOWHERE, 1, before)) which = 2;
        esr[1] = seen_esr; far[1] = seen_far;

        before = taken;
        __asm__ volatile("adr %0, 1f; 1: str %1, [%2]" : "=&r"(at) : "r"(val), "r"(NOWHERE + 8) : "memory");
        if (!which && !check(0x96000050, 0xFE00007FUL, at, NOWHERE + 8, 1, before)) which = 3;
        esr[2] = seen_esr; far[2] = seen_far;

        before = taken;
        __asm__ volatile("adr %0, 1f; 1: .inst 0x00000000" : "=r"(at) :: "memory");
        if (!which && !check(0x02000000, ~0UL, at, 0, 0, before)) which = 4;
        esr[3] = seen_esr; far[3] = 0;

        before = taken;
        __asm__ volatile("adr %0, 1f; 1: brk #0x77" : "=r"(at) :: "memory");
        if (!which && !check(0xF2000077, ~0UL, at, 0, 0, before)) which = 5;
        esr[4] = seen_esr; far[4] = 0;

        if (which) {
            report(cpu, FAIL, (u64)which, seen_esr, "traps", " exception");
            for (;;) wfi();
        }
        u64 irqs = uart_irqs;
        uart_txim(1);  /* the next character raises SPI 33 once */
        round++;
        char *p = line;
        static const char *names[5] = {" svc esr=", " dabt-ld esr=", " dabt-st esr=",
                                       " undef esr=", " brk esr="};
        for (int i = 0; i < 5; i++) {
            const char *n = names[i];
            while (*n) *p++ = *n++;
            p = fmt_hex(p, esr[i]);
            if (i == 1 || i == 2) {
                *p++ = ' '; *p++ = 'f'; *p++ = 'a'; *p++ = 'r'; *p++ = '=';
                p = fmt_hex(p, far[i]);
            }
        }
        *p = 0;
        report(cpu, OK, round, esr[0], "traps", line);
        if (uart_irqs != irqs + 1) {
            report(cpu, FAIL, 6, uart_irqs - irqs, "traps", " uart interrupts");
            for (;;) wfi();
        }
    }
}
