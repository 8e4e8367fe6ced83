/*
 * hotset: forever increments one byte in every page of a `wss=` working set (split among the
 * CPUs). CPU 0 sends a HEARTBEAT when every CPU has finished another pass (counter = full
 * passes), at most one per `hb=` ms (default 10; hb=0: every pass).
 */
#include "rt.h"

const char wl_name[] = "hotset";
const u32 wl_id = WL_HOTSET;

static volatile u8 *base;
static u64 npages, hb_period;
static struct { volatile u64 passes; u8 pad[56]; } pc[MAXCPU] __attribute__((aligned(64)));

void wl_setup(void)
{
        u64 wss = param("wss", 64 * MiB), got;
        base = (volatile u8 *)alloc_region(wss, &got);
        if (got < wss)
                kprintf("hotset info wss=%luK does not fit, using %luK\n", wss >> 10, got >> 10);
        npages = got / PAGE_SIZE;
        if (npages < ncpus)
                npages = ncpus;
        hb_period = ms_to_tsc(param("hb", 10));
        kprintf("hotset info pages=%lu at 0x%lx\n", npages, (u64)base);
}

void wl_run(u32 cpu)
{
        u64 lo = npages * cpu / ncpus, hi = npages * (cpu + 1) / ncpus;
        u64 last = 0, deadline = rdtsc();
        for (;;) {
                for (u64 p = lo; p < hi; p++)
                        base[p * PAGE_SIZE]++;
                pc[cpu].passes++;
                if (cpu != 0)
                        continue;
                u64 m = pc[0].passes;
                for (u32 i = 1; i < ncpus; i++)
                        if (pc[i].passes < m)
                                m = pc[i].passes;
                if (m > last && periodic_due(&deadline, hb_period)) {
                        report_hb(0, m, npages);
                        last = m;
                }
        }
}
