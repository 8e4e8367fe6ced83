/*
 * idle: every CPU runs its LAPIC timer periodically (every min(hb, 10) ms) and halts between
 * interrupts. CPU 0 sends a HEARTBEAT every `hb=` ms (default 100), counter = heartbeats,
 * aux = timer interrupts taken by all CPUs so far.
 *
 * `fill=SIZE` makes every page of a region of that size non-zero once at start (a machine
 * holding data, e.g. a template for clones); `touch=N` then has CPU 0 write N random pages per
 * second, on its timer ticks, among the first `touchset=SIZE` of that region (default: all of
 * it; a small touchset is a small working set).
 */
#include "rt.h"

const char wl_name[] = "idle";
const u32 wl_id = WL_IDLE;

static u64 hb_ms, lapic_hz;
static u32 tick_count;
static volatile u64 ticks;
static volatile u8 *fill;
static u64 fill_pages, touch_pages_n, touch_rate, rng = 0x9E3779B97F4A7C15UL;

static void on_tick(u32 cpu)
{
        (void)cpu;
        __atomic_fetch_add(&ticks, 1, __ATOMIC_RELAXED);
}

void wl_setup(void)
{
        hb_ms = param("hb", 100);
        if (!hb_ms)
                hb_ms = 1;
        u64 tick_ms = hb_ms < 10 ? hb_ms : 10;
        lapic_hz = lapic_timer_calibrate();
        u64 c = lapic_hz / 1000 * tick_ms;
        tick_count = c > 0xFFFFFFFFUL ? 0xFFFFFFFFU : c ? (u32)c : 1;
        timer_hook = on_tick;
        u64 fill_bytes = param("fill", 0), got = 0;
        if (fill_bytes) {
                fill = (volatile u8 *)alloc_region(fill_bytes, &got);
                fill_pages = got / PAGE_SIZE;
                for (u64 p = 0; p < fill_pages; p++)
                        *(volatile u64 *)(fill + p * PAGE_SIZE) = p * 0x100000001B3UL + 1;
                touch_rate = param("touch", 0);
                touch_pages_n = param("touchset", got) / PAGE_SIZE;
                if (!touch_pages_n || touch_pages_n > fill_pages)
                        touch_pages_n = fill_pages;
                kprintf("idle info fill pages=%lu touch=%lu/s over %lu pages\n", fill_pages,
                        touch_rate, touch_pages_n);
        }
        kprintf("idle info lapic_timer=%luMHz tick=%lums count=%u\n", lapic_hz / 1000000,
                tick_ms, tick_count);
}

/* CPU 0, on each wake-up: the random page writes due since the last one (touch= per second) */
static void touch_pages(u64 *last, u64 tsc_per_s)
{
        u64 now = rdtsc();
        if (now < *last || now - *last > tsc_per_s) {
                *last = now;  /* the TSC jumped (a restored clone, a long pause): start over */
                return;
        }
        u64 due = (now - *last) * touch_rate / tsc_per_s;
        if (!due)
                return;
        *last = now;
        while (due--) {
                rng = rng * 6364136223846793005UL + 1442695040888963407UL;
                fill[(rng >> 33) % touch_pages_n * PAGE_SIZE + 8]++;
        }
}

void wl_run(u32 cpu)
{
        u64 period = ms_to_tsc(hb_ms), deadline = rdtsc() + period, n = 0;
        u64 last_touch = rdtsc(), tsc_per_s = ms_to_tsc(1000);
        lapic_timer_periodic(TIMER_VECTOR, tick_count);
        __asm__ volatile("sti");
        for (;;) {
                __asm__ volatile("hlt" ::: "memory");
                if (cpu == 0 && periodic_due(&deadline, period))
                        report_hb(0, ++n, ticks);
                if (cpu == 0 && touch_rate && fill_pages)
                        touch_pages(&last_touch, tsc_per_s);
        }
}
