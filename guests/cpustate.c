/*
 * cpustate: each CPU loads values derived from (CPU index, loop counter) into all general
 * registers but rsp, xmm0-15 and, with AVX (`avx=0` off, `avx=1` on, default auto), the
 * upper halves of ymm0-15; spins `spin=`
 * iterations (default 20000); then checks every register. A mismatch is a FAIL with value =
 * register index (0-15 GPR by encoding, 16-31 xmm0-15, 32-47 ymm0-15 upper half), aux = loop.
 * CPU 0 sends a HEARTBEAT every `hb=` ms (default 100), counter = its loop count.
 */
#include "rt.h"

const char wl_name[] = "cpustate";
const u32 wl_id = WL_CPUSTATE;

void cs_round(const u64 *want, u64 *got, u64 spin, u64 avx);

static const char gpr_names[16][4] = {
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
};

static u64 spin, hb_period;

/*
 * Some hypervisors (e.g. KVM on PVM, nested) run a non-enlightened guest through KVM's
 * instruction emulator, which has no AVX: a VEX instruction stops the VM with an emulation
 * failure. Such CPUs are ~1000x slower than native, which is easy to see.
 */
static int cpu_is_emulated(void)
{
        u64 n = 100000, t0 = rdtsc();
        __asm__ volatile("1: dec %0; jnz 1b" : "+r"(n));
        return rdtsc() - t0 > ms_to_tsc(20);
}

void wl_setup(void)
{
        u64 avx = param("avx", 2);              /* 0 off, 1 on if the CPU has it, 2 auto */
        if (have_avx && avx == 0)
                have_avx = 0;
        if (have_avx && avx == 2 && cpu_is_emulated()) {
                kprintf("cpustate info CPU looks emulated instruction by instruction: not using "
                        "AVX (avx=1 forces it)\n");
                have_avx = 0;
        }
        spin = param("spin", 20000);
        if (!spin)
                spin = 1;
        hb_period = ms_to_tsc(param("hb", 100));
        kprintf("cpustate info avx=%d spin=%lu\n", have_avx, spin);
}

void wl_run(u32 cpu)
{
        static u64 want_all[MAXCPU][80] __attribute__((aligned(64)));
        static u64 got_all[MAXCPU][80] __attribute__((aligned(64)));
        u64 *want = want_all[cpu], *got = got_all[cpu];
        u64 deadline = rdtsc() + hb_period;
        u32 nregs = have_avx ? 48 : 32;

        for (u64 loop = 1;; loop++) {
                u64 seed = mix64(((u64)(cpu + 1) << 40) ^ loop);
                for (u32 i = 0; i < 80; i++) {
                        want[i] = mix64(seed + i);
                        got[i] = ~want[i];
                }
                cs_round(want, got, spin, (u64)have_avx);
                for (u32 r = 0; r < nregs; r++) {
                        u32 a, b;               /* u64 slots holding register r */
                        if (r < 16) {
                                if (r == 4)
                                        continue;
                                a = b = r;
                        } else {
                                a = 16 + 2 * (r - 16);
                                b = a + 1;
                        }
                        if (want[a] == got[a] && want[b] == got[b])
                                continue;
                        u32 k = want[a] != got[a] ? a : b;
                        char name[12];
                        if (r < 16) {
                                for (u32 i = 0; i < 4; i++)
                                        name[i] = gpr_names[r][i];
                        } else {
                                u32 x = (r - 16) % 16, i = 0;
                                name[i++] = r < 32 ? 'x' : 'y';
                                name[i++] = 'm';
                                name[i++] = 'm';
                                if (x >= 10)
                                        name[i++] = '1';
                                name[i++] = (char)('0' + x % 10);
                                if (r >= 32)
                                        for (const char *h = ".hi"; *h; h++)
                                                name[i++] = *h;
                                name[i] = 0;
                        }
                        report_fail(cpu, r, loop, "reg=%u (%s) want=0x%016lx got=0x%016lx cpu=%u "
                                    "loop=%lu", r, name, want[k], got[k], cpu, loop);
                }
                if (cpu == 0 && periodic_due(&deadline, hb_period))
                        report_hb(0, loop, nregs);
        }
}
