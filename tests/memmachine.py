"""Test double for protocol tests: a machine with RAM and no CPU, implementing the contract.

It lets the engine be exercised and measured without a hypervisor: `scribble` writes pages
the way a guest would (and marks them dirty), `save_state` returns a small fixed state. It is
not a backend: nothing runs in it.
"""

from __future__ import annotations

import mmap
import threading

import numpy as np

from livemig.contract import PAGE_SIZE, Arch, MachineConfig, MachineState, StateError
from livemig.probe import ProbeLog


class MemoryRam:
    """Anonymous-mmap RAM with an explicit dirty bitmap."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.page_size = PAGE_SIZE
        self.fd: int | None = None
        self._map = mmap.mmap(-1, size)
        self._dirty = np.zeros(size // PAGE_SIZE, dtype=bool)
        self._logging = False
        self._lock = threading.Lock()
        self.pages = np.frombuffer(self._map, np.uint8).reshape(-1, PAGE_SIZE)

    def view(self) -> memoryview:
        return memoryview(self._map)

    def start_dirty_log(self) -> None:
        with self._lock:
            self._logging = True
            self._dirty[:] = False

    def fetch_dirty(self) -> np.ndarray:
        with self._lock:
            out = self._dirty.copy()
            self._dirty[:] = False
        return out

    def stop_dirty_log(self) -> None:
        self._logging = False

    def data_pages(self) -> np.ndarray:
        return np.ones(self.size // PAGE_SIZE, dtype=bool)

    def template_deltas(self) -> np.ndarray | None:
        return None

    def hand_over(self) -> list[int]:
        return []

    def write(self, idx: np.ndarray, value: int) -> None:
        """Fill pages `idx` with byte `value`, as a guest write (marks them dirty)."""
        self.pages[idx] = value
        with self._lock:
            self._dirty[idx] = True


class MemoryMachine:
    """Contract-only machine: RAM, a probe log, pause/resume flags, a tiny state."""

    cpu_model = "memory"

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.memory = MemoryRam(config.mem_size)
        self.probe = ProbeLog()
        self.running = False
        self.vcpu_lock = threading.Lock()
        self.started = False
        self.closed = False
        self.throttle = 0.0
        self.throttles: list[float] = []
        self.loaded: MachineState | None = None
        self.counter = 0

    def start(self) -> None:
        self.started = True
        self.running = True

    def pause(self) -> None:
        # As the contract asks: return only once no "vCPU" (a test's writer thread holding
        # vcpu_lock around each burst) is in the middle of a write.
        with self.vcpu_lock:
            self.running = False

    def resume(self) -> None:
        self.running = True

    def save_state(self) -> MachineState:
        return MachineState(self.config.arch, self.cpu_model, [{"counter": self.counter}
                                                               for _ in range(self.config.vcpus)])

    def load_state(self, state: MachineState) -> None:
        state.check_compatible(self.config.arch, self.cpu_model, self.config.vcpus)
        if not state.vcpus or "counter" not in state.vcpus[0]:
            raise StateError("memory machine state lacks its counter")
        self.loaded = state
        self.counter = int(state.vcpus[0]["counter"])

    def set_throttle(self, fraction: float) -> None:
        self.throttle = fraction
        self.throttles.append(fraction)

    def close(self) -> None:
        self.closed = True
        self.running = False


def memory_config(mem_size: int = 64 << 20, vcpus: int = 1) -> MachineConfig:
    return MachineConfig(Arch.X86_64, mem_size, vcpus, image="memory")
