/*
 * verify: every word of every page of a `wss=` region holds a function of (page index, version); a version
 * table in guest RAM (just below the pages) holds each page's version. Each CPU owns a disjoint
 * slice of pages: it re-checks its slice continually and rewrites random pages of it (checking
 * each first) at its share of `rate=` pages/s, bumping the version. A mismatch is reported as
 * FAIL (value = page index, aux = expected version), the page is repaired and checking goes on.
 * CPU 0 reports OK (value = full passes without failure) and HEARTBEAT (value = full passes)
 * when every CPU has finished another pass, at most once per `hb=` ms (default 10).
 * `corrupt=1` flips a byte of one page once after the first OK, to prove detection.
 */
#include "rt.h"

const char wl_name[] = "verify";
const u32 wl_id = WL_VERIFY;

#define WORDS (PAGE_SIZE / 8)
#define SALT 0x6C6D7072766572UL
#define MAX_FAILS_PER_PASS 16

static u64 *pages;
static volatile u32 *vt;
static u64 npages, rate, hb_period, corrupt;
static volatile u32 corrupt_req;
static struct {
        volatile u64 passes, clean;
        u64 fails_this_pass, suppressed, rng;
        u8 pad[24];
} pc[MAXCPU] __attribute__((aligned(64)));

static inline u64 pattern(u64 page, u32 version) { return mix64((page << 32 ^ version) + SALT); }

/* Every word of page p holds pattern(p, v); string instructions keep this cheap even where the
 * CPU is emulated instruction by instruction. */
static void fill(u64 p, u32 v)
{
        u64 *w = pages + p * WORDS, n = WORDS;
        __asm__ volatile("rep stosq" : "+D"(w), "+c"(n) : "a"(pattern(p, v)) : "memory");
}

/* Index of the first word of page p that is not x, or WORDS. */
static u64 mismatch(u64 p, u64 x)
{
        u64 *w = pages + p * WORDS, n = WORDS;
        __asm__ volatile("repe scasq" : "+D"(w), "+c"(n) : "a"(x) : "memory", "cc");
        if (n == 0 && w[-1] == x)
                return WORDS;
        return WORDS - n - 1;
}

/* Check one page against its version; on a mismatch report it and repair the page. */
static int check(u32 cpu, u64 p)
{
        u32 v = vt[p];
        u64 x = pattern(p, v), i = mismatch(p, x);
        if (i == WORDS)
                return 1;
        if (pc[cpu].fails_this_pass++ < MAX_FAILS_PER_PASS)
                report_fail(cpu, p, v, "page=%lu want=0x%016lx got=0x%016lx word=%lu version=%u "
                            "cpu=%u", p, x, pages[p * WORDS + i], i, v, cpu);
        else
                pc[cpu].suppressed++;
        fill(p, v + 1);
        vt[p] = v + 1;
        return 0;
}

static void rewrite(u32 cpu, u64 p)
{
        check(cpu, p);
        u32 v = vt[p] + 1;
        fill(p, v);
        vt[p] = v;
}

void wl_setup(void)
{
        u64 wss = param("wss", 64 * MiB), got;
        u64 want = wss / PAGE_SIZE;
        if (want < ncpus)
                want = ncpus;
        u64 vt_bytes = (want * 4 + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
        u64 region = alloc_region(vt_bytes + want * PAGE_SIZE, &got);
        npages = want;
        if (got < vt_bytes + want * PAGE_SIZE) {
                npages = (got - PAGE_SIZE) / (PAGE_SIZE + 4);
                vt_bytes = (npages * 4 + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
                kprintf("verify info wss=%luK does not fit, using %luK\n", wss >> 10,
                        npages * PAGE_SIZE >> 10);
        }
        vt = (volatile u32 *)region;
        pages = (u64 *)(region + vt_bytes);
        rate = param("rate", 20000);
        hb_period = ms_to_tsc(param("hb", 10));
        corrupt = param("corrupt", 0);
        kprintf("verify info pages=%lu at 0x%lx versions at 0x%lx rate=%lu\n", npages,
                (u64)pages, (u64)vt, rate);
}

void wl_run(u32 cpu)
{
        u64 lo = npages * cpu / ncpus, hi = npages * (cpu + 1) / ncpus, n = hi - lo;
        u64 cost = rate ? tsc_hz * ncpus / rate : 0;    /* TSC ticks per rewrite */
        u64 cap = tsc_hz / 100 > cost ? tsc_hz / 100 : cost;
        u64 credit = 0, tlast = rdtsc();
        u64 last_hb = 0, last_ok = 0, deadline = rdtsc();
        u64 victim = lo + n / 2;
        int bad = 0;

        for (u64 p = lo; p < hi; p++) {
                vt[p] = 0;
                fill(p, 0);
        }
        pc[cpu].rng = mix64(cpu + 1 + rdtsc());
        for (u64 cur = lo;;) {
                u64 before = pc[cpu].fails_this_pass;
                check(cpu, cur);

                /* rewrites at this CPU's share of the rate (at most 8 per page checked) */
                u32 writes = 0;
                if (!rate) {
                        writes = 1;
                } else {
                        u64 now = rdtsc();
                        if (now > tlast)
                                credit += now - tlast;
                        tlast = now;
                        if (credit > cap)
                                credit = cap;
                        while (credit >= cost && writes < 8) {
                                credit -= cost;
                                writes++;
                        }
                }
                while (writes--) {
                        u64 r = pc[cpu].rng;
                        r ^= r << 13; r ^= r >> 7; r ^= r << 17;
                        pc[cpu].rng = r;
                        rewrite(cpu, lo + r % n);
                }
                if (pc[cpu].fails_this_pass != before)
                        bad = 1;

                if (corrupt_req == 1 && cpu == ncpus - 1) {
                        ((volatile u8 *)(pages + victim * WORDS))[1234] ^= 0x5A;
                        corrupt_req = 2;
                        kprintf("verify info corrupted page=%lu (debug corrupt=1)\n", victim);
                }

                if (++cur == hi) {
                        cur = lo;
                        if (pc[cpu].suppressed) {
                                kprintf("verify info cpu=%u: %lu more failures not reported\n",
                                        cpu, pc[cpu].suppressed);
                                pc[cpu].suppressed = 0;
                        }
                        pc[cpu].fails_this_pass = 0;
                        if (!bad)
                                pc[cpu].clean++;
                        bad = 0;
                        pc[cpu].passes++;
                }
                if (cpu != 0 || (cur & 63))
                        continue;
                u64 mp = pc[0].passes, mc = pc[0].clean;
                for (u32 i = 1; i < ncpus; i++) {
                        if (pc[i].passes < mp)
                                mp = pc[i].passes;
                        if (pc[i].clean < mc)
                                mc = pc[i].clean;
                }
                if (mp > last_hb && periodic_due(&deadline, hb_period)) {
                        if (mc > last_ok) {
                                report_ok(0, mc, npages);
                                last_ok = mc;
                                if (corrupt && !corrupt_req)
                                        corrupt_req = 1;
                        }
                        report_hb(0, mp, npages);
                        last_hb = mp;
                }
        }
}
