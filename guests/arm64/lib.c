/* UART, probe, command line and time helpers shared by the AArch64 guests. */
#include "guest.h"

#define UART_DR ((volatile u32 *)0x09000000UL)
#define UART_FR ((volatile u32 *)0x09000018UL)
#define PROBE ((volatile u64 *)0x0A000000UL)

struct record { u32 magic, kind, vcpu, pad; u64 value, aux; };
static struct record records[MAX_CPUS] __attribute__((aligned(64)));

static void putc_raw(char c)
{
    while (*UART_FR & (1 << 5))
        ;
    *UART_DR = (u8)c;
}

void puts_cpu(u32 cpu, const char *s)
{
    (void)cpu;
    while (*s)
        putc_raw(*s++);
}

static char *fmt_u64(char *p, u64 v)
{
    char tmp[24];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

static char *fmt_str(char *p, const char *s)
{
    while (*s)
        *p++ = *s++;
    return p;
}

/* One probe record, then the same report as a UART line: "<name> <kind> N[ extra] cpu=I". */
void report(u32 cpu, u32 kind, u64 value, u64 aux, const char *name, const char *extra)
{
    static const char *kinds[] = {"", "boot cpus=", "hb ", "ok ", "FAIL "};
    struct record *r = &records[cpu];
    char line[160], *p = line;
    r->magic = 0x52504D4C;
    r->kind = kind;
    r->vcpu = cpu;
    r->pad = 0;
    r->value = value;
    r->aux = aux;
    __asm__ volatile("dsb sy" ::: "memory");
    *PROBE = (u64)r;
    p = fmt_str(p, name);
    p = fmt_str(p, " ");
    p = fmt_str(p, kinds[kind]);
    p = fmt_u64(p, kind == BOOT ? aux : value);
    if (kind == FAIL) {
        p = fmt_str(p, " aux=");
        p = fmt_u64(p, aux);
    }
    if (extra)
        p = fmt_str(p, extra);
    p = fmt_str(p, " cpu=");
    p = fmt_u64(p, cpu);
    p = fmt_str(p, "\n");
    *p = 0;
    puts_cpu(cpu, line);
}

/* Value of `key` (e.g. "wss=") in the command line, with K/M/G suffixes; dflt when absent. */
u64 param(const char *cmdline, const char *key, u64 dflt)
{
    const char *s = cmdline;
    while (s && *s) {
        const char *k = key, *t = s;
        while (*k && *t == *k) { k++; t++; }
        if (!*k && (s == cmdline || s[-1] == ' ')) {
            u64 v = 0;
            if (*t < '0' || *t > '9')
                return dflt;
            while (*t >= '0' && *t <= '9')
                v = v * 10 + (u64)(*t++ - '0');
            if (*t == 'K' || *t == 'k') v <<= 10;
            if (*t == 'M' || *t == 'm') v <<= 20;
            if (*t == 'G' || *t == 'g') v <<= 30;
            return v;
        }
        s++;
    }
    return dflt;
}

u32 cpus_wanted(const char *cmdline, u32 ncpus)
{
    u64 n = param(cmdline, "cpus=", ncpus);
    if (n == 0 || n > ncpus) n = ncpus;
    if (n > MAX_CPUS) n = MAX_CPUS;
    return (u32)n;
}

u64 ticks(void) { __asm__ volatile("isb"); return SYSREG_READ(cntvct_el0); }
u64 tick_freq(void) { return SYSREG_READ(cntfrq_el0); }

u32 this_cpu(void)
{
    extern char stacks[];
    u64 sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    return (u32)(((sp - (u64)stacks) >> 14) & (MAX_CPUS - 1));
}

void guest_exception(u64 vec, u64 esr, u64 elr, u64 far)
{
    (void)elr; (void)far;
    report(this_cpu(), FAIL, 0xE000 + vec, esr, "exception", 0);
    for (;;)
        __asm__ volatile("wfi");
}

/* --- interrupts: GICv2 (distributor, CPU interface) and the generic timer --- */
#define GICD ((volatile u32 *)0x08000000UL)
#define GICD_BYTE ((volatile u8 *)0x08000000UL)
#define GICC ((volatile u32 *)0x08010000UL)
#define UART_IMSC ((volatile u32 *)0x09000038UL)
#define UART_ICR ((volatile u32 *)0x09000044UL)
#define NIRQ 64

static irq_fn irq_handlers[NIRQ];
sync_fn sync_handler;

void gic_init_cpu(u32 cpu)
{
    if (cpu == 0)
        GICD[0] = 1;          /* GICD_CTLR: forward interrupts */
    GICC[0x04 / 4] = 0xF0;    /* PMR: let every priority below 0xF0 through */
    GICC[0] = 1;              /* GICC_CTLR: signal this CPU */
}

/* Enable interrupt `id` (priority 0x80) with handler `fn`; an SPI goes to `cpu`. */
void irq_on(u32 id, u32 cpu, int edge, irq_fn fn)
{
    irq_handlers[id] = fn;
    GICD_BYTE[0x400 + id] = 0x80;
    if (id >= 32) {
        GICD_BYTE[0x800 + id] = (u8)(1 << cpu);
        u32 cfg = GICD[(0xC00 >> 2) + id / 16], bit = 2 << (2 * (id % 16));
        GICD[(0xC00 >> 2) + id / 16] = edge ? (cfg | bit) : (cfg & ~bit);
    }
    GICD[(0x100 >> 2) + id / 32] = 1U << (id % 32);
}

void send_sgi(u32 id, u32 targets) { GICD[0xF00 / 4] = (targets & 0xFF) << 16 | (id & 15); }

/* MSR DAIF (register form, not DAIFClr): the board sees it and takes a waiting IRQ at once */
void irq_enable(void) { __asm__ volatile("msr daif, %0; isb" :: "r"(0UL) : "memory"); }
void irq_disable(void) { __asm__ volatile("msr daif, %0; isb" :: "r"(0x3c0UL) : "memory"); }
void wfi(void) { __asm__ volatile("wfi" ::: "memory"); }

void timer_set(u64 cval) { __asm__ volatile("msr cntv_cval_el0, %0; isb" :: "r"(cval)); }
u64 timer_ctl(void) { return SYSREG_READ(cntv_ctl_el0); }
void timer_start(u64 period)
{
    timer_set(ticks() + period);
    __asm__ volatile("msr cntv_ctl_el0, %0; isb" :: "r"(1UL));
}

void uart_txim(int on) { *UART_IMSC = on ? (1 << 5) : 0; }
void uart_clear_tx(void) { *UART_ICR = 1 << 5; }

char *fmt_hex(char *p, u64 v)
{
    int shift = 60;
    *p++ = '0';
    *p++ = 'x';
    while (shift > 0 && !((v >> shift) & 15))
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        *p++ = "0123456789abcdef"[(v >> shift) & 15];
    return p;
}

static void irq_dispatch(u32 cpu)
{
    for (;;) {
        u32 iar = GICC[0x0C / 4], id = iar & 0x3FF;
        if (id >= 1020)
            return;
        if (id < NIRQ && irq_handlers[id])
            irq_handlers[id](cpu, id, (iar >> 10) & 7);
        else
            report(cpu, FAIL, 0xF000 + id, iar, "irq", " unexpected interrupt");
        GICC[0x10 / 4] = iar;  /* EOIR */
    }
}

/* Called by the vectors (start.S): vector 0-15 (4 groups of sync, IRQ, FIQ, SError). */
void exception_entry(u64 vec, u64 *frame)
{
    if ((vec & 3) == 1) {
        irq_dispatch(this_cpu());
        return;
    }
    if ((vec & 3) == 0 && sync_handler) {
        sync_handler(this_cpu(), SYSREG_READ(esr_el1), SYSREG_READ(far_el1), frame);
        return;
    }
    guest_exception(vec, SYSREG_READ(esr_el1), frame[31], SYSREG_READ(far_el1));
}

void guest_main(const char *cmdline, u64 ram_size, u64 cpu, u64 ncpus)
{
    u32 want = cpus_wanted(cmdline, (u32)ncpus);
    if (cpu >= want)
        for (;;)
            __asm__ volatile("wfi");
    workload(cmdline, ram_size, (u32)cpu, want);
    for (;;)
        __asm__ volatile("wfi");
}
