"""x86-64 vCPU set-up and state: CPUID, the multiboot entry state, capture and restore.

A vCPU's saved state is a map of named fields (see docs/snapshot.md):
`regs`, `sregs`, `xsave`, `xcrs`, `lapic`, `vcpu_events`, `debugregs` (the kernel structures
as bytes), `mp_state` (int) and `msrs` (list of [index, value]).
"""

from __future__ import annotations

import ctypes
from typing import Any

from livemig.contract import StateError
from livemig.kvm import Kvm, KvmError, KvmRegs, KvmSregs, Vcpu
from livemig.kvm.structs import (
    SIZE_DEBUGREGS,
    SIZE_LAPIC,
    SIZE_VCPU_EVENTS,
    SIZE_XCRS,
    KvmCpuidEntry2,
)

BLOBS = ("xsave", "xcrs", "lapic", "vcpu_events", "debugregs")

MSR_TSC_DEADLINE = 0x6E0


def cpu_model(entries: list[KvmCpuidEntry2]) -> str:
    """Vendor, family, model and stepping, from the CPUID the guest is given."""
    leaf = {(e.function, e.index): e for e in entries}
    v = leaf[(0, 0)]
    vendor = b"".join(x.to_bytes(4, "little") for x in (v.ebx, v.edx, v.ecx)).decode(
        "ascii", "replace")
    sig = leaf[(1, 0)].eax
    family = ((sig >> 8) & 0xF) + ((sig >> 20) & 0xFF)
    model = ((sig >> 4) & 0xF) | (((sig >> 16) & 0xF) << 4)
    return f"{vendor} family {family:#x} model {model:#x} stepping {sig & 0xF}"


def cpuid_for(entries: list[KvmCpuidEntry2], index: int) -> list[KvmCpuidEntry2]:
    """The host-supported CPUID with this vCPU's APIC id filled in."""
    out = []
    for e in entries:
        c = KvmCpuidEntry2.from_buffer_copy(e)
        if c.function == 1:
            c.ebx = (c.ebx & 0x00FFFFFF) | (index << 24)
        elif c.function in (0xB, 0x1F):
            c.edx = index
        out.append(c)
    return out


def migratable_msrs(kvm: Kvm, vcpu: Vcpu) -> list[int]:
    """MSRs of the host's list that this vCPU can both read and write back unchanged."""
    keep = []
    for idx in kvm.msr_index_list():
        if not vcpu.msr_readable(idx):
            continue
        value = vcpu.get_msrs([idx])[0][1]
        try:
            vcpu.set_msrs([(idx, value)])
        except KvmError:
            continue
        keep.append(idx)
    return keep


def set_multiboot_entry(vcpu: Vcpu, entry: int, info_addr: int, magic: int) -> None:
    """Flat 32-bit protected mode, paging off, as the multiboot spec hands over."""
    sregs = vcpu.get_sregs()
    for name, sel, typ in (("cs", 0x10, 0xB), ("ds", 0x18, 0x3), ("es", 0x18, 0x3),
                           ("fs", 0x18, 0x3), ("gs", 0x18, 0x3), ("ss", 0x18, 0x3)):
        seg = getattr(sregs, name)
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, sel, typ
        seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.unusable = 1, 0, 1, 1, 0, 1, 0
    sregs.cr0 = 0x11  # PE | ET
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = KvmRegs()
    regs.rip, regs.rax, regs.rbx, regs.rflags = entry, magic, info_addr, 0x2
    vcpu.set_regs(regs)


def save_vcpu(vcpu: Vcpu, msrs: list[int]) -> dict[str, Any]:
    state: dict[str, Any] = {
        "regs": bytes(vcpu.get_regs()),
        "sregs": bytes(vcpu.get_sregs()),
        "mp_state": vcpu.get_mp_state(),
        "msrs": [[i, v] for i, v in vcpu.get_msrs(msrs)],
    }
    for name in BLOBS:
        state[name] = vcpu.get_blob(name)
    return state


def check_vcpu_state(state: dict[str, Any], sizes: dict[str, int]) -> None:
    """Raise StateError if a saved vCPU map lacks a field or has one of the wrong size."""
    if not isinstance(state, dict):
        raise StateError("vCPU state is not a map")
    for name, size in sizes.items():
        blob = state.get(name)
        if not isinstance(blob, bytes):
            raise StateError(f"vCPU state lacks field {name!r}")
        if len(blob) != size:
            raise StateError(f"vCPU field {name!r} is {len(blob)} bytes, this host uses {size}")
    if not isinstance(state.get("mp_state"), int) or not isinstance(state.get("msrs"), list):
        raise StateError("vCPU state lacks mp_state or msrs")
    for m in state["msrs"]:
        if (not isinstance(m, list | tuple) or len(m) != 2
                or not all(isinstance(x, int) and 0 <= x < 1 << 64 for x in m)):
            raise StateError("vCPU state has an MSR entry that is not [index, value]")


def load_vcpu(vcpu: Vcpu, state: dict[str, Any]) -> None:
    vcpu.set_mp_state(state["mp_state"])
    vcpu.set_regs(KvmRegs.from_buffer_copy(state["regs"]))
    vcpu.set_sregs(KvmSregs.from_buffer_copy(state["sregs"]))
    vcpu.set_blob("xsave", state["xsave"])
    vcpu.set_blob("xcrs", state["xcrs"])
    vcpu.set_blob("debugregs", state["debugregs"])
    vcpu.set_blob("lapic", state["lapic"])
    msrs = [(int(i), int(v)) for i, v in state["msrs"]]
    # The deadline only means something once the LAPIC timer mode is restored, so it goes last.
    msrs.sort(key=lambda m: m[0] == MSR_TSC_DEADLINE)
    vcpu.set_msrs(msrs)
    vcpu.set_blob("vcpu_events", state["vcpu_events"])


def blob_sizes(kvm: Kvm) -> dict[str, int]:
    """Size of each bytes field of a vCPU state on this host."""
    return {
        "regs": ctypes.sizeof(KvmRegs), "sregs": ctypes.sizeof(KvmSregs),
        "xsave": kvm.xsave_size, "xcrs": SIZE_XCRS, "lapic": SIZE_LAPIC,
        "vcpu_events": SIZE_VCPU_EVENTS, "debugregs": SIZE_DEBUGREGS,
    }

