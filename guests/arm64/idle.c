/* idle: sleeps in WFI between interrupts. Every CPU runs its virtual timer (CNTV, PPI 27) every
 * tick= ms (default 20) and reports a heartbeat per tick (value = timer interrupts taken,
 * aux = SGIs received). On each tick CPU 0 sends SGI 1 to every other CPU. CPU 0 also takes
 * SPI 40 (edge; the board raises it from the host, `Armv8Machine.raise_spi`) and reports each
 * with an OK (value = SPIs taken, aux = 40).
 * FAIL: value 1 = a timer interrupt with nothing due (CNTV_CTL.ISTATUS clear: a duplicate),
 * 2 = an SGI from a CPU other than 0, 3 = an SGI on CPU 0. */
#include "guest.h"

#define SPI_DOORBELL 40
#define SGI_TICK 1

static volatile u64 ticks_taken[MAX_CPUS], sgis[MAX_CPUS], spis, failed[MAX_CPUS], bad[MAX_CPUS];
static u64 period, deadline[MAX_CPUS];
static u32 cpus;

static void on_timer(u32 cpu, u32 id, u32 src)
{
    (void)id; (void)src;
    if (!(timer_ctl() & 4)) {  /* interrupt without the timer condition: delivered twice */
        failed[cpu] = 1;
        return;
    }
    deadline[cpu] += period;
    u64 now = ticks();
    if (deadline[cpu] <= now)  /* fell behind (host busy): next tick one period from now */
        deadline[cpu] = now + period;
    timer_set(deadline[cpu]);
    ticks_taken[cpu]++;
    if (cpu == 0 && cpus > 1)
        send_sgi(SGI_TICK, ((1U << cpus) - 1) & ~1U);
}

static void on_sgi(u32 cpu, u32 id, u32 src)
{
    (void)id;
    if (cpu == 0 || src != 0) {
        failed[cpu] = cpu == 0 ? 3 : 2;
        bad[cpu] = src;
        return;
    }
    sgis[cpu]++;
}

static void on_spi(u32 cpu, u32 id, u32 src)
{
    (void)cpu; (void)id; (void)src;
    spis++;
}

void workload(const char *cmdline, u64 ram_size, u32 cpu, u32 ncpus)
{
    u64 reported = 0, spis_reported = 0;
    (void)ram_size;
    cpus = ncpus;
    period = param(cmdline, "tick=", 20) * tick_freq() / 1000;
    if (!period) period = 1;
    gic_init_cpu(cpu);
    irq_on(PPI_CNTV, cpu, 0, on_timer);
    irq_on(SGI_TICK, cpu, 1, on_sgi);
    if (cpu == 0) {
        irq_on(SPI_DOORBELL, 0, 1, on_spi);
        report(cpu, BOOT, W_IDLE, ncpus, "idle", 0);
    }
    deadline[cpu] = ticks() + period;
    timer_set(deadline[cpu]);
    __asm__ volatile("msr cntv_ctl_el0, %0; isb" :: "r"(1UL));
    irq_enable();
    for (;;) {
        wfi();
        if (failed[cpu]) {
            report(cpu, FAIL, failed[cpu], bad[cpu], "idle", " interrupt");
            for (;;)
                wfi();
        }
        u64 t = ticks_taken[cpu];
        if (t != reported) {
            reported = t;
            report(cpu, HEARTBEAT, t, sgis[cpu], "idle", 0);
        }
        if (cpu == 0 && spis != spis_reported) {
            spis_reported = spis;
            report(cpu, OK, spis_reported, SPI_DOORBELL, "idle", 0);
        }
    }
}
