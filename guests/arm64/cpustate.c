/* cpustate: holds known values in X0-X30, V0-V31, NZCV, FPCR, FPSR and the EL1 system registers
 * it can write, spins, and checks them all; also checks the registers set at boot (VBAR, TTBRs,
 * MAIR, TCR, SCTLR, CPACR).  FAIL value: 0-30 X, 32-63 V, 64+ system register (see NAMES). */
#include "guest.h"

#define NSYS 15
#define NBOOT 7
void cpustate_round(const u64 *in, u64 *out);

/* Heartbeats are timer-driven: CNTV interrupts every hb= ms. A round runs with IRQs masked
 * (the exception entry would overwrite the ELR/SPSR values it holds); they are taken in a
 * window between rounds. */
static volatile u64 tick_count[MAX_CPUS];
static u64 hb_period, hb_deadline[MAX_CPUS];

static void on_tick(u32 cpu, u32 id, u32 src)
{
    (void)id; (void)src;
    hb_deadline[cpu] += hb_period;
    if (hb_deadline[cpu] <= ticks()) hb_deadline[cpu] = ticks() + hb_period;
    timer_set(hb_deadline[cpu]);
    tick_count[cpu]++;
}

/* Bits each system register keeps (what the architecture lets EL1 write and read back). */
static const u64 sys_mask[NSYS] = {
    ~0UL, ~0UL, ~0UL, 0xffffffffUL,           /* tpidr_el0 tpidrro_el0 tpidr_el1 contextidr */
    ~0UL, 0xffffffffUL, 0x0000fffffffff000UL,  /* far_el1 esr_el1 par_el1 */
    ~0UL, 0xf0000000UL, ~0UL,                 /* elr_el1 spsr_el1(NZCV; M/DAIF fixed) sp_el0 */
    AMAIR_MASK, 0x3UL,                         /* amair_el1 cntkctl_el1 */
    0x07c00000UL, 0x0800009fUL, 0xf0000000UL   /* fpcr fpsr nzcv */
};
static const u64 sys_fixed[NSYS] = {[8] = 0x3c5};

static u64 mix(u64 x)
{
    x += 0x9E3779B97F4A7C15UL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9UL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBUL;
    return x ^ (x >> 31);
}

static u64 in_buf[MAX_CPUS][112] __attribute__((aligned(64)));
static u64 out_buf[MAX_CPUS][112] __attribute__((aligned(64)));

static void read_boot(u64 *b)
{
    b[0] = SYSREG_READ(vbar_el1);
    b[1] = SYSREG_READ(ttbr0_el1);
    b[2] = SYSREG_READ(ttbr1_el1);
    b[3] = SYSREG_READ(mair_el1);
    b[4] = SYSREG_READ(tcr_el1);
    b[5] = SYSREG_READ(sctlr_el1);
    b[6] = SYSREG_READ(cpacr_el1);
}

static long compare(u32 cpu, const u64 *boot, u64 *bad)
{
    const u64 *in = in_buf[cpu], *out = out_buf[cpu];
    u64 now[NBOOT];
    for (int i = 0; i < 64; i++)
        if (in[i] != out[i]) { *bad = out[i]; return 32 + i / 2; }
    for (int i = 0; i < 31; i++)
        if (in[64 + i] != out[64 + i]) { *bad = out[64 + i]; return i; }
    for (int i = 0; i < NSYS; i++)
        if ((in[96 + i] & sys_mask[i]) != (out[96 + i] & sys_mask[i])) {
            *bad = out[96 + i];
            return 64 + i;
        }
    read_boot(now);
    for (int i = 0; i < NBOOT; i++)
        if (now[i] != boot[i]) { *bad = now[i]; return 64 + NSYS + i; }
    return -1;
}

void workload(const char *cmdline, u64 ram_size, u32 cpu, u32 ncpus)
{
    u64 boot[NBOOT], freq = tick_freq();
    u64 rounds = 0, hb = 0;
    u64 spins = param(cmdline, "spins=", 20000);
    (void)ram_size;
    read_boot(boot);
    if (boot[0] == 0 || boot[1] != (u64)pgtable || boot[3] != MAIR_VALUE || boot[4] != TCR_VALUE
        || !(boot[5] & 1)) {
        report(cpu, FAIL, 64 + NSYS, boot[5], "cpustate", " boot registers");
        return;
    }
    if (cpu == 0) report(cpu, BOOT, W_CPUSTATE, ncpus, "cpustate", 0);
    hb_period = param(cmdline, "hb=", 100) * freq / 1000;
    if (!hb_period) hb_period = 1;
    gic_init_cpu(cpu);
    irq_on(PPI_CNTV, cpu, 0, on_tick);
    hb_deadline[cpu] = ticks() + hb_period;
    timer_start(hb_period);
    for (;;) {
        u64 *in = in_buf[cpu], bad = 0;
        for (int i = 0; i < 96; i++)
            in[i] = mix(((u64)cpu << 56) ^ (rounds << 8) ^ (u64)i);
        in[95] = spins;
        for (int i = 0; i < NSYS; i++)
            in[96 + i] = (mix(((u64)cpu << 56) ^ (rounds << 8) ^ (u64)(96 + i)) & sys_mask[i])
                         | sys_fixed[i];
        cpustate_round(in, out_buf[cpu]);
        long r = compare(cpu, boot, &bad);
        rounds++;
        if (r >= 0) {
            report(cpu, FAIL, (u64)r, bad, "cpustate", " register");
            return;
        }
        irq_enable();  /* a due tick is taken here */
        irq_disable();
        if (tick_count[cpu] != hb) {
            hb = tick_count[cpu];
            report(cpu, HEARTBEAT, hb, rounds, "cpustate", 0);
            report(cpu, OK, rounds, hb, "cpustate", 0);
        }
    }
}
