/* Shared declarations of the livemig AArch64 guests. */
#ifndef GUEST_H
#define GUEST_H

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned char u8;

#define RAM_BASE 0x40000000UL
#define PAGE 4096UL
#define MAX_CPUS 8
/* TCR_EL1: T0SZ=T1SZ=25 (39-bit VA), WB-WA inner/outer, inner shareable, 4K granules, IPS=36 bit */
#define TCR_VALUE 0x1b5193519UL
#define MAIR_VALUE 0xff00UL

enum { BOOT = 1, HEARTBEAT = 2, OK = 3, FAIL = 4 };
enum { W_HOTSET = 1, W_VERIFY = 2, W_CPUSTATE = 3 };

extern char _end[];
extern u64 pgtable[];

void guest_main(const char *cmdline, u64 ram_size, u64 cpu, u64 ncpus);
void workload(const char *cmdline, u64 ram_size, u32 cpu, u32 ncpus);
void guest_exception(u64 vec, u64 esr, u64 elr, u64 far);

void report(u32 cpu, u32 kind, u64 value, u64 aux, const char *name, const char *extra);
void puts_cpu(u32 cpu, const char *s);
u64 param(const char *cmdline, const char *key, u64 dflt);
u64 ticks(void);
u64 tick_freq(void);
u32 cpus_wanted(const char *cmdline, u32 ncpus);

#define SYSREG_READ(r) ({ u64 __v; __asm__ volatile("mrs %0, " #r : "=r"(__v)); __v; })
#endif
