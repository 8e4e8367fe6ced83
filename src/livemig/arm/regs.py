"""The ARMv8 vCPU register map: every name a saved vCPU state holds, and how unicorn reaches it.

Each vCPU state is a flat map name -> value: ints for registers of 64 bits or fewer, 16-byte
little-endian `bytes` for the 128-bit V registers (msgpack ints stop at 64 bits).
See docs/arm-state.md for the table and for what unicorn cannot reach.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from unicorn import arm64_const as A
from unicorn.unicorn_py3.arch.arm64 import UcAArch64 as Uc

from livemig.contract import StateError

# name -> unicorn register id, for registers unicorn names directly.
GPRS: dict[str, int] = {f"x{i}": getattr(A, f"UC_ARM64_REG_X{i}") for i in range(31)}
VREGS: dict[str, int] = {f"v{i}": getattr(A, f"UC_ARM64_REG_V{i}") for i in range(32)}
SPECIAL: dict[str, int] = {
    "pc": A.UC_ARM64_REG_PC,
    "fpcr": A.UC_ARM64_REG_FPCR,
    "fpsr": A.UC_ARM64_REG_FPSR,
}

# name -> (op0, op1, CRn, CRm, op2): EL1 (and EL0-accessible) system registers reached through
# UC_ARM64_REG_CP_REG.  Restored in this order (translation control before the tables).
SYSREGS: dict[str, tuple[int, int, int, int, int]] = {
    "cpacr_el1": (3, 0, 1, 0, 2),
    "mair_el1": (3, 0, 10, 2, 0),
    "amair_el1": (3, 0, 10, 3, 0),
    "tcr_el1": (3, 0, 2, 0, 2),
    "ttbr0_el1": (3, 0, 2, 0, 0),
    "ttbr1_el1": (3, 0, 2, 0, 1),
    "sctlr_el1": (3, 0, 1, 0, 0),
    "vbar_el1": (3, 0, 12, 0, 0),
    "contextidr_el1": (3, 0, 13, 0, 1),
    "tpidr_el1": (3, 0, 13, 0, 4),
    "tpidr_el0": (3, 3, 13, 0, 2),
    "tpidrro_el0": (3, 3, 13, 0, 3),
    "elr_el1": (3, 0, 4, 0, 1),
    "spsr_el1": (3, 0, 4, 0, 0),
    "esr_el1": (3, 0, 5, 2, 0),
    "afsr0_el1": (3, 0, 5, 1, 0),
    "afsr1_el1": (3, 0, 5, 1, 1),
    "far_el1": (3, 0, 6, 0, 0),
    "par_el1": (3, 0, 7, 4, 0),
    "csselr_el1": (3, 2, 0, 0, 0),
    "mdscr_el1": (2, 0, 0, 2, 2),
    # generic timer (the virtual count itself is VM-level, see TIMER_VCT)
    "cntkctl_el1": (3, 0, 14, 1, 0),
    "cntv_ctl_el0": (3, 3, 14, 3, 1),
    "cntv_cval_el0": (3, 3, 14, 3, 2),
    "cntp_ctl_el0": (3, 3, 14, 2, 1),
    "cntp_cval_el0": (3, 3, 14, 2, 2),
}
SP_EL0 = (3, 0, 4, 1, 0)
SP_EL1 = (3, 4, 4, 1, 0)
CNTVOFF_EL2 = (3, 4, 14, 0, 3)
CNTVCT_EL0 = (3, 3, 14, 0, 2)
CNTPCT_EL0 = (3, 3, 14, 0, 1)
CNTFRQ_EL0 = (3, 3, 14, 0, 0)

INT_NAMES = [*GPRS, *SPECIAL, "pstate", "sp_el0", "sp_el1", *SYSREGS]
BYTES_NAMES = list(VREGS)
ALL_NAMES = INT_NAMES + BYTES_NAMES
_U64 = (1 << 64) - 1


def capture(uc: Uc) -> dict[str, Any]:
    """Read every register of the map from a stopped unicorn vCPU."""
    s: dict[str, Any] = {n: uc.reg_read(r) for n, r in GPRS.items()}
    s.update({n: uc.reg_read(r) for n, r in SPECIAL.items()})
    for n, r in VREGS.items():
        s[n] = int(uc.reg_read(r)).to_bytes(16, "little")
    pstate = uc.reg_read(A.UC_ARM64_REG_PSTATE)
    s["pstate"] = pstate
    # QEMU keeps the SP of the current SPSel in X31 and the other in sp_el[]
    sp, el = uc.reg_read(A.UC_ARM64_REG_SP), (pstate >> 2) & 3
    if el == 1 and pstate & 1:  # EL1h: SP is SP_EL1
        s["sp_el0"], s["sp_el1"] = uc.cpr_read(*SP_EL0), sp
    else:  # EL1t or EL0: SP is SP_EL0
        s["sp_el0"], s["sp_el1"] = sp, uc.cpr_read(*SP_EL1)
    for n, enc in SYSREGS.items():
        s[n] = uc.cpr_read(*enc)
    return s


def validate(s: Any, index: int) -> None:
    """Raise StateError unless `s` is a complete, well-typed vCPU map (nothing is changed)."""
    if not isinstance(s, dict):
        raise StateError(f"vCPU {index} state is not a map")
    missing = [n for n in ALL_NAMES if n not in s]
    if missing:
        raise StateError(f"vCPU {index} state lacks registers: {', '.join(missing[:8])}")
    for n in INT_NAMES:
        v = s[n]
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _U64:
            raise StateError(f"vCPU {index} register {n} is not a 64-bit unsigned integer")
    for n in BYTES_NAMES:
        if not isinstance(s[n], bytes) or len(s[n]) != 16:
            raise StateError(f"vCPU {index} register {n} is not 16 bytes")
    if (s["pstate"] >> 2) & 3 > 1:
        raise StateError(f"vCPU {index} is at EL{(s['pstate'] >> 2) & 3}; this board runs EL0/EL1")


def apply(uc: Uc, s: dict[str, Any]) -> None:
    """Write a validated vCPU map into a stopped unicorn vCPU."""
    uc.reg_write(A.UC_ARM64_REG_PSTATE, s["pstate"])
    for n, enc in SYSREGS.items():
        uc.cpr_write(*enc, s[n])
    for n, r in GPRS.items():
        uc.reg_write(r, s[n])
    for n, r in VREGS.items():
        uc.reg_write(r, int.from_bytes(s[n], "little"))
    for n, r in SPECIAL.items():
        uc.reg_write(r, s[n])
    if (s["pstate"] >> 2) & 3 == 1 and s["pstate"] & 1:
        uc.cpr_write(*SP_EL0, s["sp_el0"])
        uc.reg_write(A.UC_ARM64_REG_SP, s["sp_el1"])
    else:
        uc.cpr_write(*SP_EL1, s["sp_el1"])
        uc.reg_write(A.UC_ARM64_REG_SP, s["sp_el0"])


# Names `read_named` / `write_named` accept beyond the map: the architectural aliases the thesis
# (Xvisor's arch_regs) migrates. `sp` is the SP of the current SPSel, `lr` is X30.
ALIASES = ("sp", "lr")
NAMED = frozenset([*INT_NAMES, *ALIASES])


def _sp_is_el1(pstate: int) -> bool:
    """True when the current SP (UC_ARM64_REG_SP) is SP_EL1 (EL1h), else it is SP_EL0."""
    return (pstate >> 2) & 3 == 1 and bool(pstate & 1)


def check_named(values: Mapping[str, int] | Sequence[str]) -> None:
    """Raise StateError unless every name (and, for a map, every value) can be read/written."""
    unknown = [n for n in values if n not in NAMED]
    if unknown:
        raise StateError(f"unknown or non-integer registers: {', '.join(unknown[:8])} "
                         f"(V registers are reached through save_state/load_state)")
    if isinstance(values, dict):
        for n, v in values.items():
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _U64:
                raise StateError(f"register {n} value is not a 64-bit unsigned integer")
        if "pstate" in values and (values["pstate"] >> 2) & 3 > 1:
            raise StateError(f"PSTATE {values['pstate']:#x} is above EL1; this board runs EL0/EL1")


def read_named(uc: Uc, names: Sequence[str]) -> dict[str, int]:
    """Read the named 64-bit registers (map names, `sp`, `lr`) from a stopped vCPU."""
    check_named(names)
    pstate = uc.reg_read(A.UC_ARM64_REG_PSTATE)
    out: dict[str, int] = {}
    for n in names:
        if n in GPRS:
            out[n] = uc.reg_read(GPRS[n])
        elif n == "lr":
            out[n] = uc.reg_read(A.UC_ARM64_REG_X30)
        elif n == "sp":
            out[n] = uc.reg_read(A.UC_ARM64_REG_SP)
        elif n == "pstate":
            out[n] = pstate
        elif n in SPECIAL:
            out[n] = uc.reg_read(SPECIAL[n])
        elif n in ("sp_el0", "sp_el1"):
            current = (n == "sp_el1") == _sp_is_el1(pstate)
            out[n] = uc.reg_read(A.UC_ARM64_REG_SP) if current else uc.cpr_read(
                *(SP_EL0 if n == "sp_el0" else SP_EL1))
        else:
            out[n] = uc.cpr_read(*SYSREGS[n])
    return out


def write_named(uc: Uc, values: Mapping[str, int]) -> None:
    """Write the named 64-bit registers into a stopped vCPU; checks everything first.

    PSTATE goes first, since it decides which stack pointer `sp` names.
    """
    check_named(values)
    if "pstate" in values:
        uc.reg_write(A.UC_ARM64_REG_PSTATE, values["pstate"])
    pstate = uc.reg_read(A.UC_ARM64_REG_PSTATE)
    for n, v in values.items():
        if n in GPRS:
            uc.reg_write(GPRS[n], v)
        elif n == "lr":
            uc.reg_write(A.UC_ARM64_REG_X30, v)
        elif n == "sp":
            uc.reg_write(A.UC_ARM64_REG_SP, v)
        elif n == "pstate":
            continue
        elif n in SPECIAL:
            uc.reg_write(SPECIAL[n], v)
        elif n in ("sp_el0", "sp_el1"):
            if (n == "sp_el1") == _sp_is_el1(pstate):
                uc.reg_write(A.UC_ARM64_REG_SP, v)
            else:
                uc.cpr_write(*(SP_EL0 if n == "sp_el0" else SP_EL1), v)
        else:
            uc.cpr_write(*SYSREGS[n], v)
