/* Freestanding runtime shared by all x86-64 guest workloads. */
#ifndef RT_H
#define RT_H

#include "layout.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

#define PAGE_SIZE 4096UL
#define KiB (1UL << 10)
#define MiB (1UL << 20)
#define GiB (1UL << 30)

enum { PROBE_BOOT = 1, PROBE_HEARTBEAT = 2, PROBE_OK = 3, PROBE_FAIL = 4 };
enum { WL_HOTSET = 1, WL_VERIFY = 2, WL_CPUSTATE = 3, WL_IDLE = 4, WL_NETSERVE = 5 };

#define TIMER_VECTOR 0x40

/* ---- provided by each workload ---- */
extern const char wl_name[];
extern const u32 wl_id;
void wl_setup(void);            /* boot CPU, after SMP bring-up, before the BOOT report */
void wl_run(u32 cpu);           /* every CPU running the workload; never returns */

/* ---- runtime state ---- */
extern u32 ncpus;               /* CPUs running the workload */
extern u64 tsc_hz;
extern u64 ram_top;             /* highest RAM address + 1 (from the memory map) */
extern u64 ram_total;
extern int have_avx;
extern void (*volatile timer_hook)(u32 cpu);

/* ---- I/O ---- */
static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u64 rdtsc(void)
{
        u32 lo, hi;
        __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
        return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* ---- console and reports ---- */
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* One probe report plus its console line "<workload> <...>". */
void report_boot(void);
void report_hb(u32 cpu, u64 counter, u64 aux);
void report_ok(u32 cpu, u64 count, u64 aux);
void report_fail(u32 cpu, u64 value, u64 aux, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));

/* ---- parameters ---- */
/* Value of key= on the command line (sizes may carry K/M/G), or def if absent. */
u64 param(const char *key, u64 def);
/* Text of key= on the command line copied into buf (NUL-terminated, cut to size); 0 if absent. */
int param_str(const char *key, char *buf, u64 size);

/* ---- memory ---- */
/* A RAM range of `size` bytes above the image (2 MiB aligned); *got may be less if RAM is short. */
u64 alloc_region(u64 size, u64 *got);
void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);

/* ---- time ---- */
static inline u64 ms_to_tsc(u64 ms) { return tsc_hz / 1000 * ms; }
/*
 * Periodic deadline on the TSC: true (and re-armed) once `period` has passed. Never catches up
 * on missed periods and re-arms if time jumped backwards (a pause / migration is harmless).
 */
int periodic_due(u64 *deadline, u64 period);
void udelay(u64 us);

/* ---- LAPIC ---- */
u32 cpu_index(void);
void lapic_eoi(void);
u64 lapic_timer_calibrate(void);        /* LAPIC timer ticks per second (divide by 1) */
void lapic_timer_periodic(u32 vector, u32 count);

/* ---- misc ---- */
void halt_forever(void) __attribute__((noreturn));
static inline u64 mix64(u64 x)
{
        x ^= x >> 30; x *= 0xBF58476D1CE4E5B9UL;
        x ^= x >> 27; x *= 0x94D049BB133111EBUL;
        x ^= x >> 31;
        return x;
}

#endif
