/*
 * hotset: forever increments one byte in every page of a `wss=` working set (split among the
 * CPUs). CPU 0 sends a HEARTBEAT when every CPU has finished another pass (counter = full
 * passes), at most one per `hb=` ms (default 10; hb=0: every pass).
 *
 * Skewed variant (hot-page prediction, `--hold-hot`): `hot=` is the region rewritten every pass
 * (`wss=` is its old name; `hot=` wins when both are given); `cold=` adds a second, larger
 * region right after it, every page of it made non-zero once at start, of which `coldrate=`
 * random pages per second (whole guest, split among the CPUs, paced by the TSC) get one byte
 * incremented between passes. Without `cold=` the workload is exactly the plain hotset.
 */
#include "rt.h"

const char wl_name[] = "hotset";
const u32 wl_id = WL_HOTSET;

static volatile u8 *base, *cold;
static u64 npages, ncold, coldrate, hb_period;
static struct { volatile u64 passes; u64 rng; u8 pad[48]; } pc[MAXCPU] __attribute__((aligned(64)));

void wl_setup(void)
{
        u64 hot = param("hot", param("wss", 64 * MiB)), cold_bytes = param("cold", 0), got;
        base = (volatile u8 *)alloc_region(hot + cold_bytes, &got);
        if (got < hot + cold_bytes)
                kprintf("hotset info hot+cold=%luK does not fit, using %luK\n",
                        (hot + cold_bytes) >> 10, got >> 10);
        if (got < hot) {
                hot = got;
                cold_bytes = 0;
        } else if (got < hot + cold_bytes) {
                cold_bytes = got - hot;
        }
        npages = hot / PAGE_SIZE;
        if (npages < ncpus)
                npages = ncpus;
        ncold = cold_bytes / PAGE_SIZE;
        if (ncold < ncpus)
                ncold = 0;
        cold = base + npages * PAGE_SIZE;
        coldrate = ncold ? param("coldrate", 1000) : 0;
        hb_period = ms_to_tsc(param("hb", 10));
        kprintf("hotset info pages=%lu at 0x%lx\n", npages, (u64)base);
        if (ncold)
                kprintf("hotset info cold pages=%lu at 0x%lx coldrate=%lu\n", ncold, (u64)cold,
                        coldrate);
}

void wl_run(u32 cpu)
{
        u64 lo = npages * cpu / ncpus, hi = npages * (cpu + 1) / ncpus;
        u64 clo = ncold * cpu / ncpus, chi = ncold * (cpu + 1) / ncpus, cn = chi - clo;
        u64 last = 0, deadline = rdtsc();
        /* cold writes: TSC ticks per write on this CPU, credit capped at 10 ms worth */
        u64 cost = coldrate ? tsc_hz * ncpus / coldrate : 0;
        u64 cap = tsc_hz / 100 > cost ? tsc_hz / 100 : cost;
        u64 credit = 0, tlast = rdtsc();

        for (u64 p = clo; p < chi; p++)
                cold[p * PAGE_SIZE] = 1;
        pc[cpu].rng = mix64(cpu + 1 + rdtsc());
        for (;;) {
                for (u64 p = lo; p < hi; p++)
                        base[p * PAGE_SIZE]++;
                if (cost && cn) {
                        u64 now = rdtsc();
                        if (now > tlast)
                                credit += now - tlast;
                        tlast = now;
                        if (credit > cap)
                                credit = cap;
                        for (; credit >= cost; credit -= cost) {
                                u64 r = pc[cpu].rng;
                                r ^= r << 13; r ^= r >> 7; r ^= r << 17;
                                pc[cpu].rng = r;
                                cold[(clo + r % cn) * PAGE_SIZE + 1]++;
                        }
                }
                pc[cpu].passes++;
                if (cpu != 0)
                        continue;
                u64 m = pc[0].passes;
                for (u32 i = 1; i < ncpus; i++)
                        if (pc[i].passes < m)
                                m = pc[i].passes;
                if (m > last && periodic_due(&deadline, hb_period)) {
                        report_hb(0, m, npages + ncold);
                        last = m;
                }
        }
}
