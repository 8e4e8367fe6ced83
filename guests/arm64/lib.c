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

void guest_exception(u64 vec, u64 esr, u64 elr, u64 far)
{
    extern char stacks[];
    u64 sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    u32 cpu = (u32)(((sp - (u64)stacks) >> 14) & (MAX_CPUS - 1));
    (void)elr; (void)far;
    report(cpu, FAIL, 0xE000 + vec, esr, "exception", 0);
    for (;;)
        __asm__ volatile("wfi");
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
