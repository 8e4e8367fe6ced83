"""ctypes layouts of the linux/kvm.h structures livemig reads field by field.

Structures that livemig only saves and restores whole (FPU, XSAVE, XCRs, LAPIC, vCPU events,
debug registers, irqchip, PIT, clock) are handled as opaque byte blobs of their kernel size:
nothing in them is interpreted, so nothing can be lost in translation.
"""

from __future__ import annotations

import ctypes

c_u8, c_u16, c_u32, c_u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

# Sizes of the opaque blobs, as in linux/kvm.h (x86).
SIZE_FPU = 416
SIZE_XSAVE = 4096
SIZE_XCRS = 392
SIZE_LAPIC = 1024
SIZE_VCPU_EVENTS = 64
SIZE_DEBUGREGS = 128
SIZE_IRQCHIP = 520
SIZE_PIT2 = 112
SIZE_CLOCK = 48
SIZE_PIT_CONFIG = 64


class KvmRegs(ctypes.Structure):
    _fields_ = [(n, c_u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", c_u64), ("limit", c_u32), ("selector", c_u16),
        ("type", c_u8), ("present", c_u8), ("dpl", c_u8), ("db", c_u8), ("s", c_u8),
        ("l", c_u8), ("g", c_u8), ("avl", c_u8), ("unusable", c_u8), ("padding", c_u8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", c_u64), ("limit", c_u16), ("padding", c_u16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [
        ("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment), ("fs", KvmSegment),
        ("gs", KvmSegment), ("ss", KvmSegment), ("tr", KvmSegment), ("ldt", KvmSegment),
        ("gdt", KvmDtable), ("idt", KvmDtable),
        ("cr0", c_u64), ("cr2", c_u64), ("cr3", c_u64), ("cr4", c_u64), ("cr8", c_u64),
        ("efer", c_u64), ("apic_base", c_u64), ("interrupt_bitmap", c_u64 * 4),
    ]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", c_u32), ("flags", c_u32), ("guest_phys_addr", c_u64),
                ("memory_size", c_u64), ("userspace_addr", c_u64)]


class KvmCoalescedMmioZone(ctypes.Structure):
    _fields_ = [("addr", c_u64), ("size", c_u32), ("pio", c_u32)]


class KvmCoalescedMmio(ctypes.Structure):
    """One entry of the coalesced ring: a guest write KVM kept instead of exiting."""

    _fields_ = [("phys_addr", c_u64), ("len", c_u32), ("pio", c_u32), ("data", c_u8 * 8)]


class KvmDirtyLog(ctypes.Structure):
    _fields_ = [("slot", c_u32), ("padding", c_u32), ("dirty_bitmap", c_u64)]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [("function", c_u32), ("index", c_u32), ("flags", c_u32), ("eax", c_u32),
                ("ebx", c_u32), ("ecx", c_u32), ("edx", c_u32), ("padding", c_u32 * 3)]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", c_u32), ("reserved", c_u32), ("data", c_u64)]


def cpuid2_type(n: int) -> type[ctypes.Structure]:
    """struct kvm_cpuid2 with room for n entries."""
    class KvmCpuid2(ctypes.Structure):
        _fields_ = [("nent", c_u32), ("padding", c_u32), ("entries", KvmCpuidEntry2 * n)]
    return KvmCpuid2


def msrs_type(n: int) -> type[ctypes.Structure]:
    """struct kvm_msrs with room for n entries."""
    class KvmMsrs(ctypes.Structure):
        _fields_ = [("nmsrs", c_u32), ("pad", c_u32), ("entries", KvmMsrEntry * n)]
    return KvmMsrs


def msr_list_type(n: int) -> type[ctypes.Structure]:
    """struct kvm_msr_list with room for n indices."""
    class KvmMsrList(ctypes.Structure):
        _fields_ = [("nmsrs", c_u32), ("indices", c_u32 * n)]
    return KvmMsrList


class KvmRunIo(ctypes.Structure):
    _fields_ = [("direction", c_u8), ("size", c_u8), ("port", c_u16), ("count", c_u32),
                ("data_offset", c_u64)]


class KvmRunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_u64), ("data", c_u8 * 8), ("len", c_u32), ("is_write", c_u8)]


class KvmRunInternal(ctypes.Structure):
    _fields_ = [("suberror", c_u32), ("ndata", c_u32), ("data", c_u64 * 16)]


class KvmRunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_u64), ("cpu", c_u32)]


class KvmRunSystemEvent(ctypes.Structure):
    _fields_ = [("type", c_u32), ("ndata", c_u32), ("data", c_u64 * 16)]


class KvmRunExit(ctypes.Union):
    _fields_ = [("io", KvmRunIo), ("mmio", KvmRunMmio), ("internal", KvmRunInternal),
                ("fail_entry", KvmRunFailEntry), ("system_event", KvmRunSystemEvent),
                ("padding", ctypes.c_char * 256)]


class KvmRun(ctypes.Structure):
    """The head of the shared kvm_run page of a vCPU."""

    _fields_ = [
        ("request_interrupt_window", c_u8), ("immediate_exit", c_u8), ("padding1", c_u8 * 6),
        ("exit_reason", c_u32), ("ready_for_interrupt_injection", c_u8), ("if_flag", c_u8),
        ("flags", c_u16), ("cr8", c_u64), ("apic_base", c_u64), ("exit", KvmRunExit),
    ]


class ExitReason:
    """KVM_EXIT_* values livemig handles or reports."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24


class MpState:
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
