"""Guest RAM: one memfd mapped shared, split into KVM slots around the PCI hole."""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np

from livemig.contract import PAGE_SIZE, BackingKind, ConfigError, MemoryBacking
from livemig.kvm import Vm
from livemig.ram import RamBacked, host_address, host_available_bytes, open_ram

LOW_MEM_END = 3 << 30  # RAM above this guest-physical address moves above 4 GiB
HIGH_MEM_START = 4 << 30


@dataclass(frozen=True)
class Slot:
    """A KVM memory slot: a range of guest-physical space backed by a range of the memfd."""

    index: int
    guest_phys: int
    offset: int  # into the memfd / RAM view
    size: int

    @property
    def first_page(self) -> int:
        return self.offset // PAGE_SIZE

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE


def layout(size: int) -> list[Slot]:
    """The slots of a machine with `size` bytes of RAM."""
    low = min(size, LOW_MEM_END)
    slots = [Slot(0, 0, 0, low)]
    if size > low:
        slots.append(Slot(1, HIGH_MEM_START, low, size - low))
    return slots


class GuestRam(RamBacked):
    """memfd-backed RAM implementing the GuestMemory contract for a KVM machine."""

    page_size = PAGE_SIZE

    def __init__(self, size: int, backing: MemoryBacking | None = None) -> None:
        backing = backing or MemoryBacking()
        if size <= 0 or size % (2 << 20):
            raise ConfigError(f"memory size {size} is not a positive multiple of 2 MiB")
        if size < 16 << 20:
            raise ConfigError("memory size must be at least 16 MiB")
        avail = host_available_bytes()
        if backing.kind is BackingKind.FRESH and size > avail:
            raise ConfigError(
                f"memory size {size >> 20} MiB is more than this host can give "
                f"({avail >> 20} MiB available)"
            )
        self.size = size
        self.slots = layout(size)
        self._ram = open_ram(size, backing, "livemig-ram")
        self.fd: int | None = self._ram.fd
        self._map = self._ram.map
        self.host_addr = host_address(self._map)
        self._vm: Vm | None = None
        self._logging = False
        self._host_dirty = np.zeros(size // PAGE_SIZE, dtype=bool)
        self._lock = threading.Lock()

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def view(self) -> memoryview:
        return memoryview(self._map)

    def attach(self, vm: Vm) -> None:
        """Register every slot with the VM."""
        self._vm = vm
        self._register(log_dirty=False)

    def _register(self, log_dirty: bool) -> None:
        assert self._vm is not None
        for s in self.slots:
            self._vm.set_memory_region(s.index, s.guest_phys, s.size, self.host_addr + s.offset,
                                       log_dirty)

    def phys_to_offset(self, gpa: int, length: int = 1) -> int:
        """RAM offset of a guest-physical range, or ValueError when it is not all RAM."""
        for s in self.slots:
            if s.guest_phys <= gpa and gpa + length <= s.guest_phys + s.size:
                return s.offset + gpa - s.guest_phys
        raise ValueError(f"guest-physical range {gpa:#x}+{length} is not RAM")

    def read_phys(self, gpa: int, length: int) -> bytes:
        off = self.phys_to_offset(gpa, length)
        return self._map[off:off + length]

    def write_phys(self, gpa: int, data: bytes) -> None:
        """Hypervisor write into guest RAM; the pages count as dirty."""
        off = self.phys_to_offset(gpa, len(data))
        self._map[off:off + len(data)] = data
        if data:
            with self._lock:
                self._host_dirty[off // PAGE_SIZE:(off + len(data) - 1) // PAGE_SIZE + 1] = True

    def start_dirty_log(self) -> None:
        if self._vm is None:
            raise RuntimeError("RAM is not attached to a VM")
        self._register(log_dirty=True)
        self._logging = True
        self.fetch_dirty()

    def fetch_dirty(self) -> np.ndarray:
        if not self._logging or self._vm is None:
            raise RuntimeError("dirty logging is not started")
        dirty = np.zeros(self.pages, dtype=bool)
        for s in self.slots:
            words = (s.pages + 63) // 64
            bitmap = (ctypes.c_uint64 * words)()
            self._vm.get_dirty_log(s.index, bitmap)
            bits = np.ctypeslib.as_array(bitmap).view(np.uint8)
            dirty[s.first_page:s.first_page + s.pages] = np.unpackbits(
                bits, bitorder="little")[:s.pages].astype(bool)
        with self._lock:
            dirty |= self._host_dirty
            self._host_dirty[:] = False
        return dirty

    def stop_dirty_log(self) -> None:
        if self._logging and self._vm is not None:
            self._register(log_dirty=False)
        self._logging = False


    def close(self) -> None:
        """Give RAM back to the host (unless another process shares it), even while a view
        of it is still alive somewhere."""
        self._ram.close()
        self.fd = None
