"""The UART's data port without an exit per byte (KVM's coalesced PIO).

Every workload prints a line per heartbeat, a byte per `outb` to the 16550's data port: about
20 exits every 10 ms, each handled in Python under the GIL while a migration's threads want it.
With KVM_CAP_COALESCED_PIO, writes to that port land in a ring that KVM shares with us, and the
vCPU goes on. The ring is drained, in order, into the same device handler:

- after every return from KVM_RUN, before the exit is handled: any other access to the UART
  (the LCR that switches the data port to the divisor, the LSR that the guest polls) exits, so
  the device sees every write in the guest's order;
- before the machine pauses, saves its state or closes: device state never misses a byte;
- every `PERIOD` seconds from a thread of its own: a guest that prints and then goes quiet (or
  halts in the kernel) still has its output delivered.

Where the kernel lacks the capability, nothing is registered and every write exits as before.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Callable

from livemig.kvm import ioctl as K
from livemig.kvm import structs as S
from livemig.kvm.errors import KvmError
from livemig.kvm.system import Kvm, Vcpu, Vm

PERIOD = 0.02  # seconds between drains of a quiet guest's output
_HEAD = 8  # struct kvm_coalesced_mmio_ring: u32 first, u32 last, then the entries


class CoalescedPorts:
    """A VM's coalesced ring for some output ports, drained into `out(port, size, value)`."""

    def __init__(self, kvm: Kvm, vm: Vm, vcpu: Vcpu, ports: list[tuple[int, int]],
                 out: Callable[[int, int, int], None]) -> None:
        self.enabled = False
        self._out = out
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        page = kvm.check_extension(K.KVM_CAP_COALESCED_MMIO)
        if page <= 0 or kvm.check_extension(K.KVM_CAP_COALESCED_PIO) <= 0:
            return
        try:
            base = vcpu.page_address(page)
            for port, size in ports:
                vm.register_coalesced_pio(port, size)
        except KvmError:
            return  # every write exits, as without the capability
        self._first = ctypes.c_uint32.from_address(base)
        self._last = ctypes.c_uint32.from_address(base + 4)
        self._max = (mmap.PAGESIZE - _HEAD) // ctypes.sizeof(S.KvmCoalescedMmio)
        self._ring = (S.KvmCoalescedMmio * self._max).from_address(base + _HEAD)
        self.enabled = True

    def start(self) -> None:
        """Drain from a thread of its own every PERIOD seconds until `stop`."""
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="coalesced", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(PERIOD):
            self.drain()

    def drain(self) -> None:
        """Hand every write in the ring to the device, oldest first."""
        if not self.enabled or self._first.value == self._last.value:
            return
        with self._lock:
            first = self._first.value
            while first != self._last.value:
                e = self._ring[first]
                size = min(e.len, 4)
                self._out(e.phys_addr, size, int.from_bytes(bytes(e.data[:size]), "little"))
                first = (first + 1) % self._max
                self._first.value = first  # the slot is free for the kernel again

    def stop(self) -> None:
        """End the drain thread, then drain what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.drain()
