/* hotset: increments one byte in every page of its share of the working set, forever;
 * a heartbeat after a pass (value = passes completed by this CPU), at most one per 10 ms. */
#include "guest.h"

void workload(const char *cmdline, u64 ram_size, u32 cpu, u32 ncpus)
{
    u64 base = ((u64)_end + (2UL << 20) - 1) & ~((2UL << 20) - 1);
    u64 avail = RAM_BASE + ram_size - base;
    u64 wss = param(cmdline, "wss=", 64UL << 20) & ~(PAGE - 1);
    if (wss > avail) wss = avail & ~(PAGE - 1);
    u64 pages = wss / PAGE, per = pages / ncpus;
    volatile u8 *p0 = (volatile u8 *)(base + cpu * per * PAGE);
    if (cpu == ncpus - 1) per = pages - per * cpu;
    u64 gap = tick_freq() / 100, next_hb = 0;
    if (cpu == 0) report(cpu, BOOT, W_HOTSET, ncpus, "hotset", 0);
    for (u64 pass = 1;; pass++) {
        for (u64 i = 0; i < per; i++)
            p0[i * PAGE + (pass & 63) * 64] += 1;
        u64 now = ticks();
        if (now >= next_hb) {
            report(cpu, HEARTBEAT, pass, per, "hotset", 0);
            next_hb = now + gap;
        }
    }
}
