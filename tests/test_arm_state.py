"""ARMv8 register map: every group survives save/encode/decode/load; bad states are refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from unicorn import arm64_const as A

from livemig.arm import Armv8Machine, regs
from livemig.contract import Arch, MachineConfig, MachineState, StateError

IMAGE = Path(__file__).resolve().parent.parent / "guests" / "arm64" / "build" / "cpustate.elf"


def fresh(vcpus: int = 2) -> Armv8Machine:
    return Armv8Machine(MachineConfig(Arch.ARM64, 32 << 20, vcpus, str(IMAGE), ""))


def set_all_groups(m: Armv8Machine) -> None:
    """Give every register of every group a distinct, valid, non-reset value."""
    for k, v in enumerate(m._vcpus):
        uc, base = v.uc, 0x1111_0000_0000_0000 * (k + 1)
        for i in range(31):
            uc.reg_write(getattr(A, f"UC_ARM64_REG_X{i}"), base + i * 0x0101_0101)
        for i in range(32):
            uc.reg_write(getattr(A, f"UC_ARM64_REG_V{i}"), (base + i) << 64 | (0xABCD0000 + i))
        uc.reg_write(A.UC_ARM64_REG_FPCR, 0x0340_0000)
        uc.reg_write(A.UC_ARM64_REG_FPSR, 0x0800_0011)
        uc.reg_write(A.UC_ARM64_REG_PSTATE, 0x6000_0345)  # Z C, D I F masked... EL1h
        uc.reg_write(A.UC_ARM64_REG_PC, 0x4008_0040 + 4 * k)
        uc.reg_write(A.UC_ARM64_REG_SP, 0x4100_0000 - 0x100 * k)  # SP_EL1 (EL1h)
        uc.cpr_write(*regs.SP_EL0, 0x4200_0000 + k)
        values = sysreg_values(k, base)
        for name, val in values.items():
            uc.cpr_write(*regs.SYSREGS[name], val)


def sysreg_values(k: int, base: int) -> dict[str, int]:
    """Distinct values for every system register of the map (vCPU k)."""
    return {
        "amair_el1": 0x44,
        "cpacr_el1": 3 << 20,
        "mair_el1": 0xFF44_0400,
        "tcr_el1": 0x1_B519_3519,
        "ttbr0_el1": 0x4010_0000,
        "ttbr1_el1": 0x4020_0000,
        "sctlr_el1": 0x30D0_198C,
        "vbar_el1": 0x4008_0800,
        "contextidr_el1": 0x1234 + k,
        "tpidr_el1": base + 1,
        "tpidr_el0": base + 2,
        "tpidrro_el0": base + 3,
        "elr_el1": 0x4008_1234,
        "spsr_el1": 0x2000_03C5,
        "esr_el1": 0x9600_0045,
        "afsr0_el1": 0,
        "afsr1_el1": 0,
        "far_el1": 0xDEAD_BEEF_0000 + k,
        "par_el1": 0x4123_4000,
        "csselr_el1": 2,
        "mdscr_el1": 0x1000,
        "cntkctl_el1": 3,
        "cntv_ctl_el0": 1,
        "cntv_cval_el0": 0x1234_5678_9ABC,
        "cntp_ctl_el0": 1,
        "cntp_cval_el0": 0x5555,
    }


def test_every_register_group_round_trips() -> None:
    a, b = fresh(), fresh()
    try:
        set_all_groups(a)
        saved = a.save_state()
        blob = saved.encode()
        b.load_state(MachineState.decode(blob))
        again = b.save_state()
        for k in range(2):
            s, t = saved.vcpus[k], again.vcpus[k]
            assert s == t, {n: (s[n], t[n]) for n in s if s[n] != t[n]}
            assert s["x7"] == 0x1111_0000_0000_0000 * (k + 1) + 7 * 0x0101_0101
            assert s["v31"] == (
                ((0x1111_0000_0000_0000 * (k + 1) + 31) << 64) | 0xABCD001F
            ).to_bytes(16, "little")
            assert s["sp_el1"] == 0x4100_0000 - 0x100 * k and s["sp_el0"] == 0x4200_0000 + k
            want = sysreg_values(k, 0x1111_0000_0000_0000 * (k + 1))
            want["amair_el1"] = 0  # RAZ/WI in unicorn's (QEMU's) Cortex-A72: see docs/arm-state.md
            got = {n: s[n] for n in want}
            assert got == want, {n: (hex(got[n]), hex(want[n])) for n in want if got[n] != want[n]}
            assert set(want) == set(regs.SYSREGS)
        # the virtual counter continues from the saved count (no jump to the host's count)
        assert 0 <= again.vm["cntvct"] - saved.vm["cntvct"] < saved.vm["cntfrq"] * 5
    finally:
        a.close()
        b.close()


def test_virtual_counter_continues_in_running_guest() -> None:
    a = fresh(1)
    try:
        a.start()
        time.sleep(0.3)
        a.pause()
        st = a.save_state()
    finally:
        a.close()
    st.vm["cntvct"] = 5 * 62_500_000  # as if the source host had counted 5 s only
    b = fresh(1)
    try:
        b.load_state(st)
        vct = b._vcpus[0].uc.cpr_read(*regs.CNTVCT_EL0)
        assert 0 <= vct - st.vm["cntvct"] < st.vm["cntfrq"]
    finally:
        b.close()


def test_x86_state_is_refused_before_anything_changes() -> None:
    a, b = fresh(), fresh()
    try:
        set_all_groups(a)
        good = a.save_state()
        before = b.save_state()
        x86 = MachineState(Arch.X86_64, "kvm-host", [{"rip": 1}, {"rip": 2}], {}, {})
        with pytest.raises(StateError, match="x86_64"):
            b.load_state(MachineState.decode(x86.encode()))
        damaged = MachineState.decode(good.encode())
        del damaged.vcpus[1]["v3"]  # vCPU 0 is fine: must not be applied either
        with pytest.raises(StateError, match="v3"):
            b.load_state(damaged)
        wrong_model = MachineState.decode(good.encode())
        wrong_model.cpu_model = "unicorn-cortex-a53"
        with pytest.raises(StateError, match="CPU model"):
            b.load_state(wrong_model)
        assert b.save_state().vcpus == before.vcpus
    finally:
        a.close()
        b.close()
