/* verify: every page of this CPU's share of the region holds fill(page, version[page]);
 * pages are rewritten at rate= pages/s (all CPUs together; 0 = flat out) and the whole share
 * is re-checked continually.  A stale page or version entry after a migration is a FAIL
 * (value = page index in the region, aux = expected version).  OK after each full check.
 * Heartbeats are timer-driven: CNTV interrupts every 100 ms, the loop reports each tick. */
#include "guest.h"

static volatile u64 tick_count[MAX_CPUS];
static u64 hb_period, hb_deadline[MAX_CPUS];

static void on_tick(u32 cpu, u32 id, u32 src)
{
    (void)id; (void)src;
    hb_deadline[cpu] += hb_period;
    if (hb_deadline[cpu] <= ticks()) hb_deadline[cpu] = ticks() + hb_period;
    timer_set(hb_deadline[cpu]);
    tick_count[cpu]++;
}

static inline u64 word(u64 page, u64 version, u64 i)
{
    return (page * 0x9E3779B97F4A7C15UL) ^ (version * 0xC2B2AE3D27D4EB4FUL) ^ (i << 48) ^ i;
}

static void fill(volatile u64 *p, u64 page, u64 version)
{
    for (u64 i = 0; i < PAGE / 8; i++)
        p[i] = word(page, version, i);
}

static int check(volatile u64 *p, u64 page, u64 version)
{
    for (u64 i = 0; i < PAGE / 8; i++)
        if (p[i] != word(page, version, i))
            return 0;
    return 1;
}

void workload(const char *cmdline, u64 ram_size, u32 cpu, u32 ncpus)
{
    u64 vtab = ((u64)_end + PAGE - 1) & ~(PAGE - 1);
    u64 wss = param(cmdline, "wss=", 64UL << 20) & ~(PAGE - 1);
    u64 rate = param(cmdline, "rate=", 20000) / ncpus;
    u64 base = (vtab + (wss / PAGE) * 4 + (2UL << 20) - 1) & ~((2UL << 20) - 1);
    if (base + wss > RAM_BASE + ram_size) wss = (RAM_BASE + ram_size - base) & ~(PAGE - 1);
    u64 pages = wss / PAGE, per = pages / ncpus, first = cpu * per;
    if (cpu == ncpus - 1) per = pages - first;
    volatile u32 *version = (volatile u32 *)vtab;
    u64 freq = tick_freq(), t0 = ticks();
    u64 written = 0, next_write = 0, hb = 0, passes = 0;

    for (u64 i = first; i < first + per; i++) {
        version[i] = 1;
        fill((volatile u64 *)(base + i * PAGE), i, 1);
    }
    if (cpu == 0) report(cpu, BOOT, W_VERIFY, ncpus, "verify", 0);
    hb_period = freq / 10;
    gic_init_cpu(cpu);
    irq_on(PPI_CNTV, cpu, 0, on_tick);
    hb_deadline[cpu] = ticks() + hb_period;
    timer_start(hb_period);
    irq_enable();
    for (;;) {
        for (u64 i = first; i < first + per; i++) {
            if (!check((volatile u64 *)(base + i * PAGE), i, version[i])) {
                report(cpu, FAIL, i, version[i], "verify", " stale page");
                for (;;)
                    __asm__ volatile("wfi");
            }
            u64 now = ticks();
            u64 due = rate ? (now - t0) / freq * rate + ((now - t0) % freq) * rate / freq : written + 8;
            for (int n = 0; written < due && n < 64; n++, written++) {
                u64 pg = first + next_write;
                u32 v = version[pg] + 1;
                fill((volatile u64 *)(base + pg * PAGE), pg, v);
                version[pg] = v;
                next_write = (next_write + 97) % per;   /* spread writes over the share */
            }
            if (written + 4096 < due) written = due - 4096;  /* never build a huge backlog */
            if (tick_count[cpu] != hb) {
                hb = tick_count[cpu];
                report(cpu, HEARTBEAT, hb, written, "verify", 0);
            }
        }
        report(cpu, OK, ++passes, per, "verify", 0);
    }
}
