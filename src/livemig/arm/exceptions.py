"""Exception entry to EL1, performed by the board where unicorn does not (docs/arm-state.md).

Unicorn reports a synchronous exception to a UC_HOOK_INTR hook (or, for an access that reaches
neither RAM nor a device, as UC_ERR_*_UNMAPPED) instead of taking it; it never takes an IRQ,
having no interrupt controller. The board then does what the architecture does on entry to
EL1: SPSR_EL1 = PSTATE, ELR_EL1 = the return address, ESR_EL1 (and FAR_EL1 for aborts) set,
PSTATE = EL1h with D, A, I and F masked (NZCV kept), SP_EL1 selected, PC = VBAR_EL1 + the
vector offset (current EL with SP0 / SPx, lower EL AArch64; + 0x0 sync, 0x80 IRQ). ERET is
unicorn's own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from unicorn import arm64_const as A
from unicorn.unicorn_py3.arch.arm64 import UcAArch64 as Uc

from livemig.arm.regs import SP_EL0, SP_EL1, SYSREGS

# QEMU's exception numbers, as unicorn's UC_HOOK_INTR reports them
EXCP_UDEF, EXCP_SWI, EXCP_BKPT = 1, 2, 7
# what unicorn's exception numbers mean, for fault messages
EXCP_NAMES = {1: "undefined instruction", 2: "SVC", 3: "prefetch abort from the MMU",
              4: "data abort from the MMU", 7: "BRK", 11: "HVC", 13: "SMC"}
# ESR_EL1 exception classes
EC_UNKNOWN, EC_SVC64, EC_IABT_LOWER, EC_IABT_SAME = 0x00, 0x15, 0x20, 0x21
EC_DABT_LOWER, EC_DABT_SAME, EC_BRK64 = 0x24, 0x25, 0x3C
IL = 1 << 25
WNR = 1 << 6
FSC_EXTERNAL = 0x10  # synchronous external abort, not on a translation table walk
_NZCV = 0xF000_0000
_EL1H_MASKED = 0x3C5  # D A I F masked, EL1, SPSel 1


class Vector(enum.IntEnum):
    """Offset of an exception type within a vector group."""

    SYNC = 0x000
    IRQ = 0x080


@dataclass(frozen=True)
class Sync:
    """A synchronous exception to take: syndrome, return address, fault address (or None)."""

    esr: int
    elr: int
    far: int | None = None


def from_intr(uc: Uc, intno: int) -> Sync | None:
    """The exception unicorn reported to its INTR hook, or None for one the board cannot take.

    PC is past the instruction for SVC, on it for an undefined instruction and BRK.
    """
    pc = uc.reg_read(A.UC_ARM64_REG_PC)
    if intno == EXCP_SWI:
        insn = int.from_bytes(uc.mem_read(pc - 4, 4), "little")
        return Sync(EC_SVC64 << 26 | IL | (insn >> 5 & 0xFFFF), pc)
    if intno == EXCP_UDEF:
        return Sync(EC_UNKNOWN << 26 | IL, pc)
    if intno == EXCP_BKPT:
        insn = int.from_bytes(uc.mem_read(pc, 4), "little")
        return Sync(EC_BRK64 << 26 | IL | (insn >> 5 & 0xFFFF), pc)
    return None


def external_abort(uc: Uc, address: int, write: bool, fetch: bool) -> Sync:
    """A synchronous external abort on an access to `address` that reached nothing."""
    pc = uc.reg_read(A.UC_ARM64_REG_PC)
    lower = (uc.reg_read(A.UC_ARM64_REG_PSTATE) >> 2) & 3 == 0
    if fetch:
        ec = EC_IABT_LOWER if lower else EC_IABT_SAME
        return Sync(ec << 26 | IL | FSC_EXTERNAL, pc, address)
    ec = EC_DABT_LOWER if lower else EC_DABT_SAME
    return Sync(ec << 26 | IL | (WNR if write else 0) | FSC_EXTERNAL, pc, address)


def enter(uc: Uc, vector: Vector, elr: int, esr: int | None = None,
          far: int | None = None) -> None:
    """Take an exception to EL1 on a stopped vCPU (see the module doc)."""
    pstate = uc.reg_read(A.UC_ARM64_REG_PSTATE)
    el, spsel = (pstate >> 2) & 3, pstate & 1
    group = 0x400 if el == 0 else 0x200 if spsel else 0x000
    sp = uc.reg_read(A.UC_ARM64_REG_SP)
    if not (el == 1 and spsel):  # the current SP is SP_EL0: keep it, switch to SP_EL1
        uc.cpr_write(*SP_EL0, sp)
        sp = uc.cpr_read(*SP_EL1)
    uc.cpr_write(*SYSREGS["spsr_el1"], pstate)
    uc.cpr_write(*SYSREGS["elr_el1"], elr)
    if esr is not None:
        uc.cpr_write(*SYSREGS["esr_el1"], esr)
    if far is not None:
        uc.cpr_write(*SYSREGS["far_el1"], far)
    uc.reg_write(A.UC_ARM64_REG_PSTATE, (pstate & _NZCV) | _EL1H_MASKED)
    uc.reg_write(A.UC_ARM64_REG_SP, sp)
    uc.reg_write(A.UC_ARM64_REG_PC, uc.cpr_read(*SYSREGS["vbar_el1"]) + group + vector)


def irq_masked(uc: Uc) -> bool:
    """PSTATE.I: IRQs are masked (an interrupt stays pending)."""
    return bool(uc.reg_read(A.UC_ARM64_REG_PSTATE) & 0x80)
