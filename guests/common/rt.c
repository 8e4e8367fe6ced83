/*
 * Runtime shared by the workloads: console, probe reports, command line, memory map, IDT and
 * exceptions, SSE/AVX enablement, TSC calibration (PIT channel 2), LAPIC and SMP bring-up.
 */
#include <stdarg.h>
#include "rt.h"

#define COM1            0x3F8
#define PROBE_PORT      0x700
#define PROBE_MAGIC     0x52504D4CU
#define MB_BOOT_MAGIC   0x2BADB002U

#define LAPIC_ID        0x020
#define LAPIC_TPR       0x080
#define LAPIC_EOI       0x0B0
#define LAPIC_SVR       0x0F0
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_ERR   0x370
#define LAPIC_TIMER_ICR 0x380
#define LAPIC_TIMER_CCR 0x390
#define LAPIC_TIMER_DIV 0x3E0

extern u32 mb_magic, mb_info;
extern volatile u32 ap_next;
extern char tramp_start[], tramp_end[], isr_table[], _end[];
extern u64 pds[];

u32 ncpus = 1;
u64 tsc_hz;
u64 ram_top, ram_total;
int have_avx;
void (*volatile timer_hook)(u32 cpu);

static char cmdline[1024];
static struct { u64 base, len; } ram[32];
static int nram;
static volatile u32 *lapic;
static volatile u32 apic_ids[MAXCPU];
static volatile u32 smp_go;

/* ------------------------------------------------------------------------------------------ */
/* libc bits the compiler may call */

void *memset(void *d, int c, u64 n)
{
        void *r = d;
        __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
        return r;
}

void *memcpy(void *d, const void *s, u64 n)
{
        void *r = d;
        __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
        return r;
}

static u64 slen(const char *s) { u64 n = 0; while (s[n]) n++; return n; }

/* ------------------------------------------------------------------------------------------ */
/* console */

static void uart_init(void)
{
        outb(COM1 + 1, 0x00);   /* no interrupts */
        outb(COM1 + 3, 0x80);   /* DLAB */
        outb(COM1 + 0, 0x01);   /* 115200 */
        outb(COM1 + 1, 0x00);
        outb(COM1 + 3, 0x03);   /* 8N1 */
        outb(COM1 + 2, 0xC7);   /* FIFO on, cleared */
        outb(COM1 + 4, 0x03);   /* DTR, RTS */
}

/* Wait for an empty transmitter (THRE), then send up to 16 bytes into the FIFO. */
static void uart_write(const char *s, u64 n)
{
        while (n) {
                for (u32 spin = 0; !(inb(COM1 + 5) & 0x20) && spin < 1000000; spin++)
                        cpu_relax();
                u64 k = n < 16 ? n : 16;
                for (u64 i = 0; i < k; i++)
                        outb(COM1, (u8)s[i]);
                s += k;
                n -= k;
        }
}

static volatile u32 print_lock_word;

static void print_lock(void)
{
        u64 start = rdtsc(), limit = tsc_hz ? tsc_hz : 4000000000UL;  /* ~1 s: never deadlock */
        while (__atomic_exchange_n(&print_lock_word, 1, __ATOMIC_ACQUIRE)) {
                cpu_relax();
                if (rdtsc() - start > limit)
                        break;
        }
}

static void print_unlock(void) { __atomic_store_n(&print_lock_word, 0, __ATOMIC_RELEASE); }

struct out { char *buf; u64 len, cap; };

static void put(struct out *o, char c)
{
        if (o->len < o->cap)
                o->buf[o->len++] = c;
}

static void put_num(struct out *o, u64 v, u32 base, int neg, u32 width, char pad)
{
        char tmp[24];
        u32 n = 0;
        do {
                tmp[n++] = "0123456789abcdef"[v % base];
                v /= base;
        } while (v);
        if (neg)
                tmp[n++] = '-';
        while (n < width--)
                put(o, pad);
        while (n)
                put(o, tmp[--n]);
}

/* %[0][width][l|ll|z](d|u|x|s|c|p) */
static void vfmt(struct out *o, const char *f, va_list ap)
{
        for (; *f; f++) {
                if (*f != '%') {
                        if (*f == '\n')
                                put(o, '\r');
                        put(o, *f);
                        continue;
                }
                f++;
                char pad = ' ';
                u32 width = 0;
                int lng = 0;
                if (*f == '0') {
                        pad = '0';
                        f++;
                }
                while (*f >= '0' && *f <= '9')
                        width = width * 10 + (u32)(*f++ - '0');
                while (*f == 'l' || *f == 'z') {
                        lng = 1;
                        f++;
                }
                switch (*f) {
                case 'd': {
                        i64 v = lng ? va_arg(ap, i64) : va_arg(ap, int);
                        put_num(o, v < 0 ? (u64)-v : (u64)v, 10, v < 0, width, pad);
                        break;
                }
                case 'u':
                        put_num(o, lng ? va_arg(ap, u64) : va_arg(ap, u32), 10, 0, width, pad);
                        break;
                case 'x':
                        put_num(o, lng ? va_arg(ap, u64) : va_arg(ap, u32), 16, 0, width, pad);
                        break;
                case 'p':
                        put(o, '0');
                        put(o, 'x');
                        put_num(o, (u64)va_arg(ap, void *), 16, 0, width, pad);
                        break;
                case 's': {
                        const char *s = va_arg(ap, const char *);
                        while (*s)
                                put(o, *s++);
                        break;
                }
                case 'c':
                        put(o, (char)va_arg(ap, int));
                        break;
                case '%':
                        put(o, '%');
                        break;
                default:
                        return;
                }
        }
}

void kprintf(const char *fmt, ...)
{
        char buf[320];
        struct out o = { buf, 0, sizeof(buf) };
        va_list ap;
        va_start(ap, fmt);
        vfmt(&o, fmt, ap);
        va_end(ap);
        print_lock();
        uart_write(buf, o.len);
        print_unlock();
}

/* ------------------------------------------------------------------------------------------ */
/* probe reports */

struct probe_rec {
        u32 magic, kind, vcpu, zero;
        u64 value, aux;
} __attribute__((aligned(32)));

static struct probe_rec probe_recs[MAXCPU];

static void probe(u32 cpu, u32 kind, u64 value, u64 aux)
{
        struct probe_rec *r = &probe_recs[cpu % MAXCPU];
        r->magic = PROBE_MAGIC;
        r->kind = kind;
        r->vcpu = cpu;
        r->zero = 0;
        r->value = value;
        r->aux = aux;
        barrier();
        outl(PROBE_PORT, (u32)(u64)r);
        barrier();
}

void report_boot(void)
{
        probe(0, PROBE_BOOT, wl_id, ncpus);
        kprintf("%s boot cpus=%u\n", wl_name, ncpus);
}

void report_hb(u32 cpu, u64 counter, u64 aux)
{
        probe(cpu, PROBE_HEARTBEAT, counter, aux);
        kprintf("%s hb %lu\n", wl_name, counter);
}

void report_ok(u32 cpu, u64 count, u64 aux)
{
        probe(cpu, PROBE_OK, count, aux);
        kprintf("%s ok %lu\n", wl_name, count);
}

void report_fail(u32 cpu, u64 value, u64 aux, const char *fmt, ...)
{
        char buf[320];
        struct out o = { buf, 0, sizeof(buf) };
        va_list ap;
        probe(cpu, PROBE_FAIL, value, aux);
        for (const char *p = wl_name; *p; p++)
                put(&o, *p);
        for (const char *p = " FAIL "; *p; p++)
                put(&o, *p);
        va_start(ap, fmt);
        vfmt(&o, fmt, ap);
        va_end(ap);
        put(&o, '\r');
        put(&o, '\n');
        print_lock();
        uart_write(buf, o.len);
        print_unlock();
}

/* ------------------------------------------------------------------------------------------ */
/* command line */

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* The value of key= (a pointer into the command line, ending at a space or NUL), or 0. */
static const char *find_param(const char *key)
{
        u64 kl = slen(key);
        const char *p = cmdline;
        while (*p) {
                while (is_space(*p))
                        p++;
                const char *w = p;
                while (*p && !is_space(*p))
                        p++;
                if ((u64)(p - w) <= kl || w[kl] != '=')
                        continue;
                u64 i = 0;
                while (i < kl && w[i] == key[i])
                        i++;
                if (i == kl)
                        return w + kl + 1;
        }
        return 0;
}

int param_str(const char *key, char *buf, u64 size)
{
        const char *v = find_param(key);
        u64 n = 0;
        if (!v || !size)
                return 0;
        while (n + 1 < size && v[n] && !is_space(v[n])) {
                buf[n] = v[n];
                n++;
        }
        buf[n] = 0;
        return 1;
}

u64 param(const char *key, u64 def)
{
        const char *v = find_param(key);
        if (v) {
                u64 n = 0, base = 10;
                int digits = 0;
                if (v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) {
                        base = 16;
                        v += 2;
                }
                for (;; v++, digits++) {
                        char c = *v;
                        u64 d;
                        if (c >= '0' && c <= '9')
                                d = (u64)(c - '0');
                        else if (base == 16 && c >= 'a' && c <= 'f')
                                d = (u64)(c - 'a' + 10);
                        else if (base == 16 && c >= 'A' && c <= 'F')
                                d = (u64)(c - 'A' + 10);
                        else
                                break;
                        n = n * base + d;
                }
                if (!digits)
                        return def;
                switch (*v) {
                case 'k': case 'K': n <<= 10; break;
                case 'm': case 'M': n <<= 20; break;
                case 'g': case 'G': n <<= 30; break;
                default: break;
                }
                return n;
        }
        return def;
}

/* ------------------------------------------------------------------------------------------ */
/* multiboot information: command line and memory map (copied before anything overwrites it) */

struct mb_mmap {
        u32 size;
        u64 addr, len;
        u32 type;
} __attribute__((packed));

static void add_ram(u64 base, u64 len)
{
        if (!len || nram >= (int)(sizeof(ram) / sizeof(ram[0])))
                return;
        ram[nram].base = base;
        ram[nram].len = len;
        nram++;
        ram_total += len;
        if (base + len > ram_top)
                ram_top = base + len;
}

static void parse_multiboot(void)
{
        if (mb_magic != MB_BOOT_MAGIC) {
                kprintf("%s info no multiboot magic (eax=0x%x); assuming 64M RAM\n",
                        wl_name, mb_magic);
                add_ram(MiB, 63 * MiB);
                return;
        }
        const u32 *mbi = (const u32 *)(u64)mb_info;
        u32 flags = mbi[0];
        if (flags & (1 << 2)) {
                const char *s = (const char *)(u64)mbi[4];
                u64 i = 0;
                for (; s[i] && i < sizeof(cmdline) - 1; i++)
                        cmdline[i] = s[i];
                cmdline[i] = 0;
        }
        if (flags & (1 << 6)) {
                u64 p = mbi[12], end = p + mbi[11];
                while (p + sizeof(struct mb_mmap) <= end) {
                        const struct mb_mmap *e = (const struct mb_mmap *)p;
                        if (e->type == 1)
                                add_ram(e->addr, e->len);
                        p += e->size + 4;
                }
        } else if (flags & 1) {
                add_ram(0, (u64)mbi[1] * KiB);
                add_ram(MiB, (u64)mbi[2] * KiB);
        } else {
                add_ram(MiB, 63 * MiB);
        }
}

/* boot.S maps the first 4 GiB; map RAM above that (up to NPD GiB) with 2 MiB pages. */
static void map_high_ram(void)
{
        u64 top = ram_top < (u64)NPD * GiB ? ram_top : (u64)NPD * GiB;
        for (u64 j = 2048; j < (top + 2 * MiB - 1) >> 21; j++)
                pds[j] = (j << 21) | 0x83;
        __asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
}

u64 alloc_region(u64 size, u64 *got)
{
        const u64 align = 2 * MiB, mapped = (u64)NPD * GiB;  /* see map_high_ram */
        u64 floor = ((u64)_end + align - 1) & ~(align - 1);
        u64 best = 0, best_len = 0;
        size = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
        for (int i = 0; i < nram; i++) {
                u64 s = ram[i].base > floor ? ram[i].base : floor;
                u64 e = ram[i].base + ram[i].len;
                s = (s + align - 1) & ~(align - 1);
                if (e > mapped)
                        e = mapped;
                if (e <= s)
                        continue;
                u64 len = (e - s) & ~(PAGE_SIZE - 1);
                if (len >= size) {
                        *got = size;
                        return s;
                }
                if (len > best_len) {
                        best = s;
                        best_len = len;
                }
        }
        *got = best_len;
        return best;
}

/* ------------------------------------------------------------------------------------------ */
/* CPU registers */

static inline u64 rdmsr(u32 msr)
{
        u32 lo, hi;
        __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
        return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
        __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
        __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

#define READ_CR(n) ({ u64 _v; __asm__ volatile("mov %%cr" #n ", %0" : "=r"(_v)); _v; })
#define WRITE_CR(n, v) __asm__ volatile("mov %0, %%cr" #n :: "r"((u64)(v)) : "memory")

/* SSE on (CR0.EM off, MP on, CR4.OSFXSR/OSXMMEXCPT); AVX state in XCR0 if the CPU has it. */
static int fpu_init(void)
{
        u32 a, b, c, d;
        u64 cr0 = READ_CR(0), cr4 = READ_CR(4);
        cr0 &= ~((1UL << 2) | (1UL << 3));      /* EM, TS */
        cr0 |= (1UL << 1) | (1UL << 5);         /* MP, NE */
        WRITE_CR(0, cr0);
        cr4 |= (1UL << 9) | (1UL << 10);
        WRITE_CR(4, cr4);
        __asm__ volatile("fninit");
        cpuid(1, 0, &a, &b, &c, &d);
        if (!(c & (1U << 26)))                  /* XSAVE */
                return 0;
        WRITE_CR(4, cr4 | (1UL << 18));         /* OSXSAVE */
        u32 xa, xb, xc, xd;
        cpuid(0xD, 0, &xa, &xb, &xc, &xd);
        u64 xcr0 = 3;
        if ((c & (1U << 28)) && (xa & 4))       /* AVX, and XCR0 can hold YMM state */
                xcr0 |= 4;
        __asm__ volatile("xsetbv" :: "c"(0), "a"((u32)xcr0), "d"((u32)(xcr0 >> 32)));
        return (xcr0 & 4) != 0;
}

/* ------------------------------------------------------------------------------------------ */
/* IDT and exceptions */

struct idt_entry {
        u16 off_lo, sel;
        u8 ist, type;
        u16 off_mid;
        u32 off_hi, zero;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(16)));

struct frame {
        u64 r15, r14, r13, r12, r11, r10, r9, r8, rdi, rsi, rbp, rbx, rdx, rcx, rax;
        u64 vec, err, rip, cs, rflags, rsp, ss;
};

static void idt_init(void)
{
        for (int i = 0; i < 256; i++) {
                u64 a = (u64)isr_table + 16 * (u64)i;
                idt[i].off_lo = (u16)a;
                idt[i].sel = SEL_CODE64;
                idt[i].ist = 0;
                idt[i].type = 0x8E;             /* present, DPL 0, 64-bit interrupt gate */
                idt[i].off_mid = (u16)(a >> 16);
                idt[i].off_hi = (u32)(a >> 32);
                idt[i].zero = 0;
        }
}

static void idt_load(void)
{
        struct { u16 limit; u64 base; } __attribute__((packed)) p = { sizeof(idt) - 1, (u64)idt };
        __asm__ volatile("lidt %0" :: "m"(p));
}

static const char *const exc_names[32] = {
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#MF-old", "#TS", "#NP",
        "#SS", "#GP", "#PF", "res15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "res22", "res23",
        "res24", "res25", "res26", "res27", "#HV", "#VC", "#SX", "res31",
};

void isr_dispatch(struct frame *f)
{
        if (f->vec == TIMER_VECTOR) {
                lapic_eoi();
                void (*h)(u32) = timer_hook;
                if (h)
                        h(0);
                return;
        }
        if (f->vec == 0xFF)                     /* LAPIC spurious: no EOI */
                return;
        if (f->vec == 2) {
                kprintf("%s info NMI on cpu %u at rip=0x%lx, ignored\n", wl_name, cpu_index(),
                        f->rip);
                return;
        }
        if (f->vec >= 32) {
                kprintf("%s info unexpected interrupt vector %lu on cpu %u, ignored\n", wl_name,
                        f->vec, cpu_index());
                lapic_eoi();
                return;
        }
        u32 cpu = cpu_index();
        report_fail(cpu, f->vec, f->rip,
                    "exception %s vector=%lu err=0x%lx rip=0x%lx cr2=0x%lx rsp=0x%lx cpu=%u",
                    exc_names[f->vec], f->vec, f->err, f->rip, READ_CR(2), f->rsp, cpu);
        halt_forever();
}

/* ------------------------------------------------------------------------------------------ */
/* time: TSC calibrated against PIT channel 2 */

/* TSC ticks during 10 ms of PIT channel 2 (mode 0), or 0 if OUT2 never rises. */
static u64 pit_measure(void)
{
        const u32 latch = 11932;                /* 10 ms of the 1.193182 MHz PIT */
        u8 v = inb(0x61);
        outb(0x61, (u8)((v & ~0x02) | 0x01));   /* gate on, speaker off */
        outb(0x43, 0xB0);                       /* channel 2, lo/hi, mode 0 */
        outb(0x42, latch & 0xFF);
        outb(0x42, latch >> 8);
        u64 t0 = rdtsc();
        u32 spins = 0;
        while (!(inb(0x61) & 0x20) && ++spins < 20000000)
                ;
        u64 t1 = rdtsc();
        outb(0x61, v & (u8)~0x03);
        return spins < 20000000 ? (t1 - t0) * 1193182UL / latch : 0;
}

static u64 calibrate_tsc(void)
{
        /* A preempted vCPU only ever makes a measurement too long: keep the shortest of 3. */
        u64 hz = 0;
        for (int i = 0; i < 3; i++) {
                u64 m = pit_measure();
                if (m && (!hz || m < hz))
                        hz = m;
        }
        if (hz >= 100000000UL && hz <= 20000000000UL)
                return hz;
        /* No usable PIT: try CPUID's TSC frequency leaves, else guess. */
        u32 a, b, c, d;
        cpuid(0, 0, &a, &b, &c, &d);
        if (a >= 0x15) {
                u32 ea, eb, ec, ed;
                cpuid(0x15, 0, &ea, &eb, &ec, &ed);
                if (ea && eb && ec)
                        hz = (u64)ec * eb / ea;
                else if (a >= 0x16) {
                        cpuid(0x16, 0, &ea, &eb, &ec, &ed);
                        hz = (u64)(ea & 0xFFFF) * 1000000UL;
                }
                if (hz >= 100000000UL && hz <= 20000000000UL) {
                        kprintf("%s info PIT unusable, TSC from CPUID\n", wl_name);
                        return hz;
                }
        }
        kprintf("%s info PIT unusable, assuming a 2 GHz TSC\n", wl_name);
        return 2000000000UL;
}

int periodic_due(u64 *deadline, u64 period)
{
        u64 now = rdtsc();
        if (now >= *deadline) {
                /* keep the cadence unless we are more than a period late (paused) */
                *deadline = (now - *deadline < period) ? *deadline + period : now + period;
                return 1;
        }
        if (*deadline - now > period)           /* the clock went backwards */
                *deadline = now + period;
        return 0;
}

void udelay(u64 us)
{
        u64 start = rdtsc(), n = tsc_hz / 1000000 * us;
        while (rdtsc() - start < n)
                cpu_relax();
}

/* ------------------------------------------------------------------------------------------ */
/* LAPIC */

static inline u32 lapic_read(u32 reg) { return lapic[reg / 4]; }
static inline void lapic_write(u32 reg, u32 v) { lapic[reg / 4] = v; }

void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }

static void lapic_init(void)
{
        u64 base = rdmsr(0x1B);
        if (!(base & (1UL << 11)))
                wrmsr(0x1B, base | (1UL << 11));
        lapic = (volatile u32 *)(base & 0xFFFFFF000UL);
        lapic_write(LAPIC_SVR, 0x100 | 0xFF);   /* software enable, spurious vector 0xFF */
        lapic_write(LAPIC_TPR, 0);
        lapic_write(LAPIC_LVT_LINT0, 1U << 16); /* no 8259 ExtINT */
        lapic_write(LAPIC_LVT_TIMER, 1U << 16);
        lapic_write(LAPIC_LVT_ERR, 1U << 16);
}

u32 cpu_index(void)
{
        if (!lapic)
                return 0;
        u32 id = lapic_read(LAPIC_ID) >> 24;
        for (u32 i = 0; i < MAXCPU; i++)
                if (apic_ids[i] == id)
                        return i;
        return 0;
}

u64 lapic_timer_calibrate(void)
{
        lapic_write(LAPIC_TIMER_DIV, 0xB);      /* divide by 1 */
        lapic_write(LAPIC_LVT_TIMER, (1U << 16) | TIMER_VECTOR);
        lapic_write(LAPIC_TIMER_ICR, 0xFFFFFFFFU);
        u64 t0 = rdtsc(), dt = ms_to_tsc(10);
        while (rdtsc() - t0 < dt)
                cpu_relax();
        u32 cur = lapic_read(LAPIC_TIMER_CCR);
        u64 t1 = rdtsc();
        lapic_write(LAPIC_TIMER_ICR, 0);
        u64 ticks = 0xFFFFFFFFUL - cur;
        return ticks * (tsc_hz / 1000) / ((t1 - t0) / 1000);
}

void lapic_timer_periodic(u32 vector, u32 count)
{
        lapic_write(LAPIC_TIMER_DIV, 0xB);
        lapic_write(LAPIC_LVT_TIMER, (1U << 17) | vector);
        lapic_write(LAPIC_TIMER_ICR, count ? count : 1);
}

static void icr_send(u32 lo)
{
        lapic_write(LAPIC_ICR_HI, 0);
        lapic_write(LAPIC_ICR_LO, lo);
        for (u32 i = 0; (lapic_read(LAPIC_ICR_LO) & (1U << 12)) && i < 1000000; i++)
                cpu_relax();
}

/* ------------------------------------------------------------------------------------------ */
/* bring-up */

static void cpu_init(void)
{
        idt_load();
        fpu_init();
        lapic_init();
}

/*
 * INIT-SIPI-SIPI to all other CPUs; returns how many APs answered (at most want). With an
 * explicit cpus=N wait up to 5 s for N-1 APs. Otherwise (no ACPI tables to count CPUs) wait
 * up to 1 s, or 100 ms once as many CPUs as CPUID.1:EBX[23:16] suggests have answered.
 */
static u32 smp_start(u32 want, int explicit)
{
        u32 a, b, c, d;
        cpuid(1, 0, &a, &b, &c, &d);
        u32 hint = (d & (1U << 28)) ? (b >> 16) & 0xFF : 1;
        memcpy((void *)(u64)TRAMP_BASE, tramp_start, (u64)(tramp_end - tramp_start));
        barrier();
        icr_send(0x000C4500);                   /* INIT, assert, all excluding self */
        udelay(10000);
        for (int i = 0; i < 2; i++) {
                icr_send(0x000C4600 | (TRAMP_BASE >> 12));      /* STARTUP */
                udelay(200);
        }
        u64 start = rdtsc(), limit = ms_to_tsc(explicit ? 5000 : 1000), quick = ms_to_tsc(100);
        for (;;) {
                u32 n = ap_next - 1;
                u64 el = rdtsc() - start;
                if (n >= want || el >= limit || (!explicit && n + 1 >= hint && el >= quick))
                        break;
                cpu_relax();
        }
        u32 n = ap_next - 1;
        return n < want ? n : want;
}

void ap_main(u32 idx)
{
        cpu_init();
        apic_ids[idx] = lapic_read(LAPIC_ID) >> 24;
        while (!smp_go)
                cpu_relax();
        if (idx >= ncpus)
                halt_forever();
        wl_run(idx);
        halt_forever();
}

void kmain(void)
{
        uart_init();
        parse_multiboot();
        map_high_ram();
        idt_init();
        have_avx = fpu_init();
        idt_load();
        lapic_init();
        for (int i = 0; i < MAXCPU; i++)
                apic_ids[i] = 0xFFFFFFFF;
        apic_ids[0] = lapic_read(LAPIC_ID) >> 24;
        outb(0x21, 0xFF);                       /* mask the 8259s */
        outb(0xA1, 0xFF);
        tsc_hz = calibrate_tsc();
        u64 want = param("cpus", 0);
        int explicit = want >= 1;
        if (want < 1 || want > MAXCPU)
                want = MAXCPU;
        ncpus = want > 1 ? 1 + smp_start((u32)want - 1, explicit) : 1;
        if (explicit && ncpus < want)
                kprintf("%s info only %u of cpus=%lu CPUs answered\n", wl_name, ncpus, want);
        kprintf("%s info cmdline=\"%s\" ram=%luM top=0x%lx tsc=%luMHz avx=%d cpus=%u image_end=0x%lx\n",
                wl_name, cmdline, ram_total >> 20, ram_top, tsc_hz / 1000000, have_avx, ncpus,
                (u64)_end);
        wl_setup();
        report_boot();
        if (param("fault", 0))                  /* debug: prove the exception path */
                __asm__ volatile("ud2");
        barrier();
        smp_go = 1;
        wl_run(0);
}
