/*
 * idle: every CPU runs its LAPIC timer periodically (every min(hb, 10) ms) and halts between
 * interrupts. CPU 0 sends a HEARTBEAT every `hb=` ms (default 100), counter = heartbeats,
 * aux = timer interrupts taken by all CPUs so far.
 */
#include "rt.h"

const char wl_name[] = "idle";
const u32 wl_id = WL_IDLE;

static u64 hb_ms, lapic_hz;
static u32 tick_count;
static volatile u64 ticks;

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
        kprintf("idle info lapic_timer=%luMHz tick=%lums count=%u\n", lapic_hz / 1000000,
                tick_ms, tick_count);
}

void wl_run(u32 cpu)
{
        u64 period = ms_to_tsc(hb_ms), deadline = rdtsc() + period, n = 0;
        lapic_timer_periodic(TIMER_VECTOR, tick_count);
        __asm__ volatile("sti");
        for (;;) {
                __asm__ volatile("hlt" ::: "memory");
                if (cpu == 0 && periodic_due(&deadline, period))
                        report_hb(0, ++n, ticks);
        }
}
