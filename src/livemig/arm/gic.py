"""GICv2 of the ARMv8 board: a distributor and one CPU interface per vCPU, both by MMIO.

Why GICv2 and not GICv3: unicorn's Cortex-A72 has no GICv3 system-register CPU interface
(ICC_* are undefined), and an MRS/MSR hook that emulates an undefined system register makes
unicorn 2.1.4 re-run the instruction forever (tried). MMIO callbacks, per vCPU, are what the
board already relies on for the UART and the probe. docs/arm-state.md has the register list.

Model: 64 interrupt IDs. SGIs 0-15 and PPIs 16-31 are banked per CPU (SGIs pending per source
CPU), SPIs 32-63 are shared with an 8-bit CPU target mask. Each ID has enable, pending (a
latch, set by an edge, ISPENDR or an SGI), active, an 8-bit priority, and a trigger (SGIs edge;
PPIs and SPIs level unless ICFGR says edge). A level-triggered ID is pending while its input
line is high, or latched. A CPU is signalled (its IRQ line) when the distributor and its CPU
interface are enabled and some enabled, pending, inactive ID targeted at it has a priority
below both its PMR and its running priority (the priority of its highest active ID). IAR
acknowledges the highest (lowest value, then lowest ID); EOIR drops priority and deactivates
(GICC_CTLR.EOImode 0 only). Not modelled: groups/FIQ (all interrupts are IRQs), binary point
(priorities compare on all 8 bits), GICD_CPENDSGIR/SPENDSGIR, GICC_DIR, security extensions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from livemig.contract import StateError

GICD_BASE = 0x0800_0000
GICC_BASE = 0x0801_0000
GIC_SIZE = 0x1_0000
N_IRQ = 64
SPURIOUS = 1023
IDLE_PRIORITY = 0xFF
PPI_CNTV = 27  # virtual timer (PPI 11), as on QEMU virt
PPI_CNTP = 30  # EL1 physical timer (PPI 14)
SPI_UART = 33  # PL011 (SPI 1)

_BANKED = 32


def _bits(ids: range, pred: Callable[[int], bool]) -> int:
    return sum(1 << (i - ids.start) for i in ids if pred(i))


class Gic:
    """The interrupt controller; every method is safe from any thread.

    `kick(cpu)` is called (outside the lock) whenever a change may have raised a CPU's IRQ line.
    """

    def __init__(self, ncpus: int, kick: Callable[[int], None]) -> None:
        self.ncpus = ncpus
        self._kick = kick
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        n, c = N_IRQ, self.ncpus
        self.dist_ctlr = 0
        # index [cpu][id]; for SPIs only row 0 is used (shared), see _row
        self.enabled = [[False] * n for _ in range(c)]
        self.latched = [[False] * n for _ in range(c)]
        self.active = [[False] * n for _ in range(c)]
        self.level = [[False] * n for _ in range(c)]
        self.priority = [[0] * n for _ in range(c)]
        self.edge = [[i < 16 for i in range(n)] for _ in range(c)]
        self.target = [0] * n
        self.sgi_sources = [[0] * 16 for _ in range(c)]
        self.cpu_ctlr = [0] * c
        self.pmr = [0] * c
        self.bpr = [0] * c
        self.running: list[list[int]] = [[] for _ in range(c)]  # active IDs in ack order

    @staticmethod
    def _row(cpu: int, intid: int) -> int:
        return cpu if intid < _BANKED else 0

    # --- the model (call with the lock held) ---

    def _pending(self, cpu: int, i: int) -> bool:
        if i < 16:
            return self.sgi_sources[cpu][i] != 0
        r = self._row(cpu, i)
        return self.latched[r][i] or (self.level[r][i] and not self.edge[r][i])

    def _targets(self, cpu: int, i: int) -> bool:
        return i < _BANKED or bool(self.target[i] >> cpu & 1)

    def _running_priority(self, cpu: int) -> int:
        stack = self.running[cpu]
        return min((self.priority[self._row(cpu, i)][i] for i in stack), default=IDLE_PRIORITY + 1)

    def _best(self, cpu: int) -> int | None:
        """Highest-priority enabled, pending, inactive ID for `cpu` below its PMR, else None."""
        best, best_prio = None, self.pmr[cpu]
        for i in range(N_IRQ):
            r = self._row(cpu, i)
            if (self.enabled[r][i] and not self.active[r][i] and self._targets(cpu, i)
                    and self._pending(cpu, i) and self.priority[r][i] < best_prio):
                best, best_prio = i, self.priority[r][i]
        return best

    def _signalled(self, cpu: int) -> bool:
        if not (self.dist_ctlr & 1 and self.cpu_ctlr[cpu] & 1):
            return False
        best = self._best(cpu)
        return best is not None and (
            self.priority[self._row(cpu, best)][best] < self._running_priority(cpu))

    def _kick_signalled(self) -> None:
        with self._lock:
            cpus = [c for c in range(self.ncpus) if self._signalled(c)]
        for c in cpus:
            self._kick(c)

    # --- lines and queries ---

    def irq_line(self, cpu: int) -> bool:
        """True while `cpu`'s IRQ input is asserted."""
        with self._lock:
            return self._signalled(cpu)

    def enabled_for(self, cpu: int) -> bool:
        """True when the distributor and `cpu`'s interface are on (the guest uses the GIC)."""
        return bool(self.dist_ctlr & 1 and self.cpu_ctlr[cpu] & 1)

    def set_level(self, cpu: int, intid: int, high: bool) -> None:
        """Drive a PPI (banked, `cpu`) or SPI (`cpu` ignored) input line."""
        with self._lock:
            r = self._row(cpu, intid)
            if self.level[r][intid] == high:
                return
            self.level[r][intid] = high
        if high:
            self._kick_signalled()

    def pulse(self, intid: int) -> None:
        """An edge on SPI `intid` (latches it pending), as a device on that line would send."""
        if not _BANKED <= intid < N_IRQ:
            raise ValueError(f"SPI ID must be {_BANKED}..{N_IRQ - 1}, not {intid}")
        with self._lock:
            self.latched[0][intid] = True
        self._kick_signalled()

    # --- CPU interface (GICC), per vCPU ---

    def cpu_read(self, cpu: int, offset: int) -> int:
        with self._lock:
            if offset == 0x00:
                return self.cpu_ctlr[cpu]
            if offset == 0x04:
                return self.pmr[cpu]
            if offset == 0x08:
                return self.bpr[cpu]
            if offset == 0x0C:
                return self._acknowledge(cpu)
            if offset == 0x14:
                return min(self._running_priority(cpu), IDLE_PRIORITY)
            if offset == 0x18:
                best = self._best(cpu)
                return SPURIOUS if best is None else best
            if offset == 0xFC:
                return 0x0202_143B  # GICC_IIDR of an ARM GIC-400 (GICv2)
        return 0

    def cpu_write(self, cpu: int, offset: int, value: int) -> None:
        with self._lock:
            if offset == 0x00:
                self.cpu_ctlr[cpu] = value & 1
            elif offset == 0x04:
                self.pmr[cpu] = value & 0xFF
            elif offset == 0x08:
                self.bpr[cpu] = value & 7
            elif offset == 0x10:
                self._end_of_interrupt(cpu, value & 0x3FF)
        self._kick_signalled()

    def _acknowledge(self, cpu: int) -> int:
        if not self._signalled(cpu):
            return SPURIOUS
        i = self._best(cpu)
        assert i is not None
        r = self._row(cpu, i)
        src = 0
        if i < 16:
            sources = self.sgi_sources[cpu][i]
            src = (sources & -sources).bit_length() - 1
            self.sgi_sources[cpu][i] &= ~(1 << src)
        else:
            self.latched[r][i] = False
        self.active[r][i] = True
        self.running[cpu].append(i)
        return i | src << 10

    def _end_of_interrupt(self, cpu: int, i: int) -> None:
        if i >= N_IRQ or i not in self.running[cpu]:
            return  # EOI of an ID not active here: ignored, as the GIC does
        self.running[cpu].remove(i)
        self.active[self._row(cpu, i)][i] = False

    # --- distributor (GICD) ---

    def dist_read(self, cpu: int, offset: int, size: int) -> int:
        with self._lock:
            if offset == 0x000:
                return self.dist_ctlr
            if offset == 0x004:
                return (N_IRQ // 32 - 1) | (self.ncpus - 1) << 5
            if offset == 0x008:
                return 0x0200_043B
            if 0x100 <= offset < 0x400:
                return self._bitmap_read(cpu, offset)
            if 0x400 <= offset < 0x400 + N_IRQ or 0x800 <= offset < 0x800 + N_IRQ:
                return self._bytes_read(cpu, offset, size)
            if 0xC00 <= offset < 0xC00 + N_IRQ // 4:
                ids = range((offset - 0xC00) * 4, (offset - 0xC00) * 4 + 16)
                return sum((2 if self.edge[self._row(cpu, i)][i] else 0) << 2 * (i - ids.start)
                           for i in ids)
            if offset == 0xFE8:
                return 0x20  # ICPIDR2: architecture version 2
        return 0

    def dist_write(self, cpu: int, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == 0x000:
                self.dist_ctlr = value & 1
            elif 0x100 <= offset < 0x400:
                self._bitmap_write(cpu, offset, value)
            elif 0x400 <= offset < 0x400 + N_IRQ:
                for k in range(size):
                    i = offset - 0x400 + k
                    if i < N_IRQ:
                        self.priority[self._row(cpu, i)][i] = value >> 8 * k & 0xFF
            elif 0x800 + _BANKED <= offset < 0x800 + N_IRQ:
                for k in range(size):
                    i = offset - 0x800 + k
                    if _BANKED <= i < N_IRQ:
                        self.target[i] = value >> 8 * k & ((1 << self.ncpus) - 1)
            elif 0xC00 <= offset < 0xC00 + N_IRQ // 4:
                first = (offset - 0xC00) * 4
                for k in range(16):
                    i = first + k
                    if 16 <= i < N_IRQ:
                        self.edge[self._row(cpu, i)][i] = bool(value >> (2 * k + 1) & 1)
            elif offset == 0xF00:
                self._send_sgi(cpu, value)
        self._kick_signalled()

    def _bitmap_read(self, cpu: int, offset: int) -> int:
        kind, word = (offset - 0x100) // 0x80, (offset & 0x7F) // 4
        ids = range(32 * word, min(32 * word + 32, N_IRQ))
        if not ids:
            return 0
        if kind in (0, 1):
            return _bits(ids, lambda i: self.enabled[self._row(cpu, i)][i])
        if kind in (2, 3):
            return _bits(ids, lambda i: self._pending(cpu, i))
        return _bits(ids, lambda i: self.active[self._row(cpu, i)][i])

    def _bitmap_write(self, cpu: int, offset: int, value: int) -> None:
        kind, word = (offset - 0x100) // 0x80, (offset & 0x7F) // 4
        for i in range(32 * word, min(32 * word + 32, N_IRQ)):
            if not value >> (i - 32 * word) & 1:
                continue
            r = self._row(cpu, i)
            if kind in (0, 1):
                self.enabled[r][i] = kind == 0
            elif kind in (2, 3) and i >= 16:  # SGI pending bits are read-only in GICv2
                self.latched[r][i] = kind == 2
            elif kind in (4, 5):
                self.active[r][i] = kind == 4

    def _bytes_read(self, cpu: int, offset: int, size: int) -> int:
        out = 0
        for k in range(size):
            o = offset + k
            if 0x400 <= o < 0x400 + N_IRQ:
                b = self.priority[self._row(cpu, o - 0x400)][o - 0x400]
            elif 0x800 <= o < 0x800 + N_IRQ:
                i = o - 0x800
                b = 1 << cpu if i < _BANKED else self.target[i]
            else:
                b = 0
            out |= b << 8 * k
        return out

    def _send_sgi(self, cpu: int, value: int) -> None:
        sgi, targets, mode = value & 0xF, value >> 16 & 0xFF, value >> 24 & 3
        everyone = (1 << self.ncpus) - 1
        mask = {0: targets, 1: everyone & ~(1 << cpu), 2: 1 << cpu}.get(mode, 0) & everyone
        for c in range(self.ncpus):
            if mask >> c & 1:
                self.sgi_sources[c][sgi] |= 1 << cpu

    # --- state ---

    def state(self) -> dict[str, Any]:
        """Everything the guest can observe or that decides a future interrupt."""
        with self._lock:
            return {
                "dist_ctlr": self.dist_ctlr,
                "enabled": [list(r) for r in self.enabled],
                "latched": [list(r) for r in self.latched],
                "active": [list(r) for r in self.active],
                "level": [list(r) for r in self.level],
                "priority": [list(r) for r in self.priority],
                "edge": [list(r) for r in self.edge],
                "target": list(self.target),
                "sgi_sources": [list(r) for r in self.sgi_sources],
                "cpu_ctlr": list(self.cpu_ctlr),
                "pmr": list(self.pmr),
                "bpr": list(self.bpr),
                "running": [list(r) for r in self.running],
            }

    FIELDS = ("dist_ctlr", "enabled", "latched", "active", "level", "priority", "edge",
              "target", "sgi_sources", "cpu_ctlr", "pmr", "bpr", "running")

    def validate(self, s: Any) -> None:
        """StateError unless `s` is a GIC state for this many CPUs (nothing is changed)."""
        if not isinstance(s, dict) or set(s) != set(self.FIELDS):
            raise StateError("gic state is missing or has unknown fields")
        c = self.ncpus
        shapes = {"enabled": (c, N_IRQ), "latched": (c, N_IRQ), "active": (c, N_IRQ),
                  "level": (c, N_IRQ), "priority": (c, N_IRQ), "edge": (c, N_IRQ),
                  "sgi_sources": (c, 16)}
        for name, (rows, cols) in shapes.items():
            v = s[name]
            if not (isinstance(v, list) and len(v) == rows
                    and all(isinstance(r, list) and len(r) == cols for r in v)):
                raise StateError(f"gic state field {name} is not {rows} x {cols}")
        for name, n in (("target", N_IRQ), ("cpu_ctlr", c), ("pmr", c), ("bpr", c),
                        ("running", c)):
            if not isinstance(s[name], list) or len(s[name]) != n:
                raise StateError(f"gic state field {name} does not have {n} entries")
        if not all(isinstance(i, int) and 0 <= i < N_IRQ for r in s["running"] for i in r):
            raise StateError("gic state has an active ID out of range")

    def load(self, s: dict[str, Any]) -> None:
        """Adopt a validated state; lines that are now signalled are kicked."""
        with self._lock:
            self.dist_ctlr = int(s["dist_ctlr"])
            for name in ("enabled", "latched", "active", "level", "edge"):
                setattr(self, name, [[bool(x) for x in r] for r in s[name]])
            self.priority = [[int(x) & 0xFF for x in r] for r in s["priority"]]
            self.sgi_sources = [[int(x) for x in r] for r in s["sgi_sources"]]
            self.target = [int(x) for x in s["target"]]
            self.cpu_ctlr = [int(x) for x in s["cpu_ctlr"]]
            self.pmr = [int(x) for x in s["pmr"]]
            self.bpr = [int(x) for x in s["bpr"]]
            self.running = [[int(x) for x in r] for r in s["running"]]
        self._kick_signalled()
