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
enum { W_HOTSET = 1, W_VERIFY = 2, W_CPUSTATE = 3, W_IDLE = 4, W_TRAPS = 5 };

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

/* interrupts (lib.c): GICv2 at 0x08000000 / 0x08010000, generic timer CNTV on PPI 27 */
#define PPI_CNTV 27
#define SPI_UART 33
typedef void (*irq_fn)(u32 cpu, u32 id, u32 source);
typedef void (*sync_fn)(u32 cpu, u64 esr, u64 far, u64 *frame);  /* frame[31] = ELR */
extern sync_fn sync_handler;
void gic_init_cpu(u32 cpu);
void irq_on(u32 id, u32 cpu, int edge, irq_fn fn);
void send_sgi(u32 id, u32 targets);  /* targets: CPU bit mask */
void timer_start(u64 period_ticks);  /* CNTV: first deadline now + period */
void timer_set(u64 cval);
u64 timer_ctl(void);
void irq_enable(void);
void irq_disable(void);
void wfi(void);
void uart_txim(int on);
void uart_clear_tx(void);
char *fmt_hex(char *p, u64 v);
u32 this_cpu(void);

#define SYSREG_READ(r) ({ u64 __v; __asm__ volatile("mrs %0, " #r : "=r"(__v)); __v; })
#endif
