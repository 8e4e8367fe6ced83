"""ioctl request numbers of the KVM API (linux/kvm.h) and the raw call."""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


def raw_ioctl(fd: int, request: int, arg: Any = None) -> tuple[int, int]:
    """Issue one ioctl; returns (result, errno). ctypes drops the GIL for the call."""
    if isinstance(arg, ctypes.Array | ctypes.Structure):
        ptr: Any = ctypes.byref(arg)
    else:
        ptr = arg
    ret = _libc.ioctl(fd, request, ptr)
    return ret, (ctypes.get_errno() if ret < 0 else 0)


# System ioctls
KVM_GET_API_VERSION = io(0x00)
KVM_CREATE_VM = io(0x01)
KVM_GET_MSR_INDEX_LIST = iowr(0x02, 4)
KVM_CHECK_EXTENSION = io(0x03)
KVM_GET_VCPU_MMAP_SIZE = io(0x04)
KVM_GET_SUPPORTED_CPUID = iowr(0x05, 8)

# VM ioctls
KVM_CREATE_VCPU = io(0x41)
KVM_GET_DIRTY_LOG = iow(0x42, 16)
KVM_SET_USER_MEMORY_REGION = iow(0x46, 32)
KVM_SET_TSS_ADDR = io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = iow(0x48, 8)
KVM_CREATE_IRQCHIP = io(0x60)
KVM_GET_IRQCHIP = iowr(0x62, 520)
KVM_SET_IRQCHIP = ior(0x63, 520)
KVM_REGISTER_COALESCED_MMIO = iow(0x67, 16)
KVM_CREATE_PIT2 = iow(0x77, 64)
KVM_SET_CLOCK = iow(0x7B, 48)
KVM_GET_CLOCK = ior(0x7C, 48)
KVM_GET_PIT2 = ior(0x9F, 112)
KVM_SET_PIT2 = iow(0xA0, 112)

# vCPU ioctls
KVM_RUN = io(0x80)
KVM_GET_REGS = ior(0x81, 144)
KVM_SET_REGS = iow(0x82, 144)
KVM_GET_SREGS = ior(0x83, 312)
KVM_SET_SREGS = iow(0x84, 312)
KVM_GET_MSRS = iowr(0x88, 8)
KVM_SET_MSRS = iow(0x89, 8)
KVM_GET_FPU = ior(0x8C, 416)
KVM_SET_FPU = iow(0x8D, 416)
KVM_GET_LAPIC = ior(0x8E, 1024)
KVM_SET_LAPIC = iow(0x8F, 1024)
KVM_SET_CPUID2 = iow(0x90, 8)
KVM_GET_MP_STATE = ior(0x98, 4)
KVM_SET_MP_STATE = iow(0x99, 4)
KVM_GET_VCPU_EVENTS = ior(0x9F, 64)
KVM_SET_VCPU_EVENTS = iow(0xA0, 64)
KVM_GET_DEBUGREGS = ior(0xA1, 128)
KVM_SET_DEBUGREGS = iow(0xA2, 128)
KVM_SET_TSC_KHZ = io(0xA2)
KVM_GET_TSC_KHZ = io(0xA3)
KVM_GET_XSAVE = ior(0xA4, 4096)
KVM_SET_XSAVE = iow(0xA5, 4096)
KVM_GET_XCRS = ior(0xA6, 392)
KVM_SET_XCRS = iow(0xA7, 392)
KVM_GET_XSAVE2 = ior(0xCF, 4096)

# Capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15  # answers the ring's page offset in a vCPU's mapping
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_PIT2 = 33
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_XSAVE2 = 208
