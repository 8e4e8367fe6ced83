"""Thin typed wrappers over the KVM file descriptors: the system, one VM, one vCPU."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from livemig.kvm import ioctl as K
from livemig.kvm import structs as S
from livemig.kvm.errors import KvmError, KvmUnavailable, KvmUnsupported

KVM_API_VERSION = 12
KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_PIT_SPEAKER_DUMMY = 1


def _check(op: str, ret: int, err: int, hint: str = "") -> int:
    if ret < 0:
        raise KvmError(op, err, hint)
    return ret


def _blob_get(fd: int, op: str, req: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    _check(op, *K.raw_ioctl(fd, req, buf))
    return buf.raw


def _blob_set(fd: int, op: str, req: int, size: int, data: bytes) -> None:
    if len(data) != size:
        raise KvmError(op, errno.EINVAL, f"expected {size} bytes, got {len(data)}")
    buf = ctypes.create_string_buffer(data, size)
    _check(op, *K.raw_ioctl(fd, req, buf))


class Kvm:
    """The /dev/kvm system handle."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise KvmUnavailable(f"open {path}", errno.ENOENT,
                                 "KVM is not available on this host") from e
        except PermissionError as e:
            raise KvmUnavailable(f"open {path}", errno.EACCES,
                                 "run as root or join the kvm group") from e
        version, err = K.raw_ioctl(self.fd, K.KVM_GET_API_VERSION, None)
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable("KVM_GET_API_VERSION", err or errno.EPROTO,
                                 f"API version {version}, livemig needs {KVM_API_VERSION}")
        for cap, name in ((K.KVM_CAP_IRQCHIP, "IRQCHIP"), (K.KVM_CAP_USER_MEMORY, "USER_MEMORY"),
                          (K.KVM_CAP_PIT2, "PIT2"), (K.KVM_CAP_XSAVE, "XSAVE"),
                          (K.KVM_CAP_XCRS, "XCRS"), (K.KVM_CAP_VCPU_EVENTS, "VCPU_EVENTS"),
                          (K.KVM_CAP_DEBUGREGS, "DEBUGREGS"), (K.KVM_CAP_MP_STATE, "MP_STATE"),
                          (K.KVM_CAP_ADJUST_CLOCK, "ADJUST_CLOCK"),
                          (K.KVM_CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT")):
            if self.check_extension(cap) <= 0:
                raise KvmUnsupported(name)
        self.vcpu_mmap_size = _check("KVM_GET_VCPU_MMAP_SIZE",
                                     *K.raw_ioctl(self.fd, K.KVM_GET_VCPU_MMAP_SIZE, None))
        self.xsave_size = max(S.SIZE_XSAVE, self.check_extension(K.KVM_CAP_XSAVE2))

    def check_extension(self, cap: int) -> int:
        ret, _ = K.raw_ioctl(self.fd, K.KVM_CHECK_EXTENSION, cap)
        return ret

    def supported_cpuid(self) -> list[S.KvmCpuidEntry2]:
        n = 128
        while True:
            cpuid = S.cpuid2_type(n)()
            cpuid.nent = n
            ret, err = K.raw_ioctl(self.fd, K.KVM_GET_SUPPORTED_CPUID, cpuid)
            if ret < 0 and err == errno.E2BIG and n < 4096:
                n *= 2
                continue
            _check("KVM_GET_SUPPORTED_CPUID", ret, err)
            return [cpuid.entries[i] for i in range(cpuid.nent)]

    def msr_index_list(self) -> list[int]:
        probe = S.msr_list_type(0)()
        ret, err = K.raw_ioctl(self.fd, K.KVM_GET_MSR_INDEX_LIST, probe)
        if ret < 0 and err != errno.E2BIG:
            _check("KVM_GET_MSR_INDEX_LIST", ret, err)
        lst = S.msr_list_type(probe.nmsrs)()
        lst.nmsrs = probe.nmsrs
        _check("KVM_GET_MSR_INDEX_LIST", *K.raw_ioctl(self.fd, K.KVM_GET_MSR_INDEX_LIST, lst))
        return [lst.indices[i] for i in range(lst.nmsrs)]

    def create_vm(self) -> Vm:
        fd = _check("KVM_CREATE_VM", *K.raw_ioctl(self.fd, K.KVM_CREATE_VM, 0))
        return Vm(self, fd)

    def close(self) -> None:
        os.close(self.fd)


class Vm:
    """One KVM virtual machine: memory slots, in-kernel devices, VM-level state."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def set_tss_addr(self, addr: int) -> None:
        _check("KVM_SET_TSS_ADDR", *K.raw_ioctl(self.fd, K.KVM_SET_TSS_ADDR, addr))

    def set_identity_map_addr(self, addr: int) -> None:
        val = ctypes.c_uint64(addr)
        _check("KVM_SET_IDENTITY_MAP_ADDR",
               *K.raw_ioctl(self.fd, K.KVM_SET_IDENTITY_MAP_ADDR, ctypes.addressof(val)))

    def create_irqchip(self) -> None:
        _check("KVM_CREATE_IRQCHIP", *K.raw_ioctl(self.fd, K.KVM_CREATE_IRQCHIP, None))

    def register_coalesced_pio(self, port: int, size: int) -> None:
        """Guest writes to ports port..port+size-1 go into the coalesced ring without an exit
        (KVM_CAP_COALESCED_PIO); reads still exit."""
        zone = S.KvmCoalescedMmioZone(port, size, 1)
        _check("KVM_REGISTER_COALESCED_MMIO (pio)",
               *K.raw_ioctl(self.fd, K.KVM_REGISTER_COALESCED_MMIO, zone))

    def create_pit2(self) -> None:
        # KVM_PIT_SPEAKER_DUMMY: the kernel also answers port 0x61 (gate and output of
        # channel 2), which guests use to calibrate their clocks.
        cfg = ctypes.create_string_buffer(S.SIZE_PIT_CONFIG)
        ctypes.c_uint32.from_buffer(cfg).value = KVM_PIT_SPEAKER_DUMMY
        _check("KVM_CREATE_PIT2", *K.raw_ioctl(self.fd, K.KVM_CREATE_PIT2, cfg))

    def set_memory_region(self, slot: int, guest_phys: int, size: int, host_addr: int,
                          log_dirty: bool = False) -> None:
        region = S.KvmUserspaceMemoryRegion(slot, KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0,
                                            guest_phys, size, host_addr)
        _check(f"KVM_SET_USER_MEMORY_REGION slot {slot}",
               *K.raw_ioctl(self.fd, K.KVM_SET_USER_MEMORY_REGION, region))

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None:
        log = S.KvmDirtyLog(slot, 0, ctypes.addressof(bitmap))
        _check(f"KVM_GET_DIRTY_LOG slot {slot}", *K.raw_ioctl(self.fd, K.KVM_GET_DIRTY_LOG, log))

    def get_irqchip(self, chip_id: int) -> bytes:
        buf = ctypes.create_string_buffer(S.SIZE_IRQCHIP)
        ctypes.c_uint32.from_buffer(buf).value = chip_id
        _check(f"KVM_GET_IRQCHIP {chip_id}", *K.raw_ioctl(self.fd, K.KVM_GET_IRQCHIP, buf))
        return buf.raw

    def set_irqchip(self, data: bytes) -> None:
        _blob_set(self.fd, "KVM_SET_IRQCHIP", K.KVM_SET_IRQCHIP, S.SIZE_IRQCHIP, data)

    def get_pit2(self) -> bytes:
        return _blob_get(self.fd, "KVM_GET_PIT2", K.KVM_GET_PIT2, S.SIZE_PIT2)

    def set_pit2(self, data: bytes) -> None:
        _blob_set(self.fd, "KVM_SET_PIT2", K.KVM_SET_PIT2, S.SIZE_PIT2, data)

    def get_clock(self) -> bytes:
        return _blob_get(self.fd, "KVM_GET_CLOCK", K.KVM_GET_CLOCK, S.SIZE_CLOCK)

    def set_clock(self, data: bytes) -> None:
        # Only the clock value is restored: flags/realtime from another host mean nothing here.
        clock = ctypes.create_string_buffer(S.SIZE_CLOCK)
        clock.raw = data[:8] + bytes(S.SIZE_CLOCK - 8)
        _check("KVM_SET_CLOCK", *K.raw_ioctl(self.fd, K.KVM_SET_CLOCK, clock))

    def create_vcpu(self, index: int) -> Vcpu:
        fd = _check(f"KVM_CREATE_VCPU {index}", *K.raw_ioctl(self.fd, K.KVM_CREATE_VCPU, index))
        return Vcpu(self, fd, index)

    def close(self) -> None:
        os.close(self.fd)


class Vcpu:
    """One vCPU: its kvm_run page and its state ioctls."""

    def __init__(self, vm: Vm, fd: int, index: int) -> None:
        self.vm = vm
        self.fd = fd
        self.index = index
        self._run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_base = ctypes.addressof(ctypes.c_char.from_buffer(self._run_map))
        self.run = S.KvmRun.from_address(self.run_base)

    def run_once(self) -> int:
        """KVM_RUN; returns 0 or the errno (EINTR when kicked)."""
        ret, err = K.raw_ioctl(self.fd, K.KVM_RUN, None)
        return err if ret < 0 else 0

    def page_address(self, page: int) -> int:
        """Address of page `page` of this vCPU's mapping (the coalesced ring is one of them)."""
        if not 0 <= page < self.vm.kvm.vcpu_mmap_size // mmap.PAGESIZE:
            raise KvmError("vCPU mapping", errno.EINVAL, f"no page {page}")
        return self.run_base + page * mmap.PAGESIZE

    def io_data(self, offset: int, length: int) -> ctypes.Array:
        return (ctypes.c_uint8 * length).from_address(self.run_base + offset)

    def set_cpuid(self, entries: list[S.KvmCpuidEntry2]) -> None:
        cpuid = S.cpuid2_type(len(entries))()
        cpuid.nent = len(entries)
        for i, e in enumerate(entries):
            cpuid.entries[i] = e
        _check(f"KVM_SET_CPUID2 vcpu {self.index}", *K.raw_ioctl(self.fd, K.KVM_SET_CPUID2, cpuid))

    def get_regs(self) -> S.KvmRegs:
        regs = S.KvmRegs()
        _check("KVM_GET_REGS", *K.raw_ioctl(self.fd, K.KVM_GET_REGS, regs))
        return regs

    def set_regs(self, regs: S.KvmRegs) -> None:
        _check("KVM_SET_REGS", *K.raw_ioctl(self.fd, K.KVM_SET_REGS, regs))

    def get_sregs(self) -> S.KvmSregs:
        sregs = S.KvmSregs()
        _check("KVM_GET_SREGS", *K.raw_ioctl(self.fd, K.KVM_GET_SREGS, sregs))
        return sregs

    def set_sregs(self, sregs: S.KvmSregs) -> None:
        _check("KVM_SET_SREGS", *K.raw_ioctl(self.fd, K.KVM_SET_SREGS, sregs))

    def get_blob(self, name: str) -> bytes:
        """Read one opaque state structure by its name in BLOBS."""
        get_req, _, size = _blob_table(self.vm.kvm)[name]
        return _blob_get(self.fd, f"KVM_GET_{name.upper()}", get_req, size)

    def set_blob(self, name: str, data: bytes) -> None:
        _, set_req, size = _blob_table(self.vm.kvm)[name]
        _blob_set(self.fd, f"KVM_SET_{name.upper()}", set_req, size, data)

    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        msrs = S.msrs_type(len(indices))()
        msrs.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            msrs.entries[i].index = idx
        n = _check("KVM_GET_MSRS", *K.raw_ioctl(self.fd, K.KVM_GET_MSRS, msrs))
        if n != len(indices):
            raise KvmError("KVM_GET_MSRS", errno.EIO, f"MSR {indices[n]:#x} could not be read")
        return [(msrs.entries[i].index, msrs.entries[i].data) for i in range(n)]

    def set_msrs(self, values: list[tuple[int, int]]) -> None:
        msrs = S.msrs_type(len(values))()
        msrs.nmsrs = len(values)
        for i, (idx, val) in enumerate(values):
            msrs.entries[i].index = idx
            msrs.entries[i].data = val
        n = _check("KVM_SET_MSRS", *K.raw_ioctl(self.fd, K.KVM_SET_MSRS, msrs))
        if n != len(values):
            raise KvmError("KVM_SET_MSRS", errno.EIO,
                           f"MSR {values[n][0]:#x} = {values[n][1]:#x} was refused")

    def msr_readable(self, index: int) -> bool:
        msrs = S.msrs_type(1)()
        msrs.nmsrs = 1
        msrs.entries[0].index = index
        ret, _ = K.raw_ioctl(self.fd, K.KVM_GET_MSRS, msrs)
        return ret == 1

    def get_mp_state(self) -> int:
        v = ctypes.c_uint32()
        _check("KVM_GET_MP_STATE", *K.raw_ioctl(self.fd, K.KVM_GET_MP_STATE, ctypes.byref(v)))
        return v.value

    def set_mp_state(self, state: int) -> None:
        v = ctypes.c_uint32(state)
        _check("KVM_SET_MP_STATE", *K.raw_ioctl(self.fd, K.KVM_SET_MP_STATE, ctypes.byref(v)))

    def get_tsc_khz(self) -> int:
        return _check("KVM_GET_TSC_KHZ", *K.raw_ioctl(self.fd, K.KVM_GET_TSC_KHZ, None))

    def close(self) -> None:
        try:
            self._run_map.close()
        except BufferError:  # the ctypes view still references the page; dropped with the fd
            pass
        os.close(self.fd)


def _blob_table(kvm: Kvm) -> dict[str, tuple[int, int, int]]:
    """name -> (get request, set request, size) of the opaque per-vCPU structures."""
    xs = kvm.xsave_size
    # Both request numbers encode 4096 whatever the real size: the kernel copies its own size.
    get_xsave = K.KVM_GET_XSAVE2 if xs > S.SIZE_XSAVE else K.KVM_GET_XSAVE
    return {
        "fpu": (K.KVM_GET_FPU, K.KVM_SET_FPU, S.SIZE_FPU),
        "xsave": (get_xsave, K.KVM_SET_XSAVE, xs),
        "xcrs": (K.KVM_GET_XCRS, K.KVM_SET_XCRS, S.SIZE_XCRS),
        "lapic": (K.KVM_GET_LAPIC, K.KVM_SET_LAPIC, S.SIZE_LAPIC),
        "vcpu_events": (K.KVM_GET_VCPU_EVENTS, K.KVM_SET_VCPU_EVENTS, S.SIZE_VCPU_EVENTS),
        "debugregs": (K.KVM_GET_DEBUGREGS, K.KVM_SET_DEBUGREGS, S.SIZE_DEBUGREGS),
    }
