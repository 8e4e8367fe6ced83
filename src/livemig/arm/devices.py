"""MMIO devices of the ARMv8 board: a PL011 UART (transmit side) and the livemig probe."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, BinaryIO

from livemig.contract import StateError
from livemig.probe import RECORD, ProbeLog

UART_BASE = 0x0900_0000
UART_SIZE = 0x1000

_FR = 0x18
_RIS, _MIS, _ICR, _IMSC = 0x3C, 0x40, 0x44, 0x38
TXIS = 1 << 5  # transmit interrupt: the (always empty) FIFO can take more
_FR_TXFE_RXFE = 0x90  # transmit FIFO empty, receive FIFO empty: never busy, nothing to read
_ID = {
    0xFE0: 0x11,
    0xFE4: 0x10,
    0xFE8: 0x14,
    0xFEC: 0x00,
    0xFF0: 0x0D,
    0xFF4: 0xF0,
    0xFF8: 0x05,
    0xFFC: 0xB1,
}
# Registers kept from the guest's writes (several are write-only or write-to-clear on PL011).
_KEPT = {
    0x08: "ilpr",
    0x24: "ibrd",
    0x28: "fbrd",
    0x2C: "lcr_h",
    0x30: "cr",
    0x34: "ifls",
    0x38: "imsc",
    0x48: "dmacr",
    0x44: "icr",
}

Console = BinaryIO | Callable[[bytes], None] | None


class Pl011:
    """PL011 transmit path; one line buffer per vCPU so lines of different CPUs never mix.

    Interrupts: transmitting a character sets the transmit interrupt (RIS.TXRIS: the FIFO is
    empty again at once); ICR clears it; the SPI line (`irq`) is high while RIS & IMSC.
    """

    def __init__(self, vcpus: int, console: Console, keep: int = 1000,
                 irq: Callable[[bool], None] | None = None) -> None:
        self._console = console
        self._irq = irq
        self._lock = threading.Lock()
        self.regs: dict[str, int] = {n: 0 for n in _KEPT.values()}
        self.regs["cr"] = 0x301  # UARTEN | TXE | RXE (reset value)
        self.regs["ris"] = 0
        self._partial = [bytearray() for _ in range(vcpus)]
        self.lines: deque[bytes] = deque(maxlen=keep)  # recent complete lines, for status/tests

    def read(self, offset: int) -> int:
        if offset == _FR:
            return _FR_TXFE_RXFE
        if offset in _ID:
            return _ID[offset]
        if offset == _RIS:
            return self.regs["ris"]
        if offset == _MIS:
            return self.regs["ris"] & self.regs["imsc"]
        name = _KEPT.get(offset)
        return self.regs[name] if name and name != "icr" else 0

    def write(self, vcpu: int, offset: int, value: int) -> None:
        if offset == 0:
            self._put(vcpu, value & 0xFF)
            self.regs["ris"] |= TXIS
        elif offset in _KEPT:
            self.regs[_KEPT[offset]] = value & 0xFFFF
            if offset == _ICR:
                self.regs["ris"] &= ~value
        else:
            return
        if offset in (0, _ICR, _IMSC):
            self.drive()

    def drive(self) -> None:
        """Set the interrupt line from RIS & IMSC."""
        if self._irq is not None:
            self._irq(bool(self.regs["ris"] & self.regs["imsc"]))

    def _put(self, vcpu: int, ch: int) -> None:
        buf = self._partial[vcpu]
        buf.append(ch)
        if ch != 0x0A and len(buf) < 512:
            return
        line = bytes(buf)
        buf.clear()
        with self._lock:
            self.lines.append(line)
            out = self._console
            if out is None:
                return
            if callable(out) and not hasattr(out, "write"):
                out(line)
            else:
                out.write(line)
                out.flush()  # type: ignore[union-attr]

    def state(self) -> dict[str, Any]:
        return {"regs": dict(self.regs), "partial": [bytes(b) for b in self._partial]}

    @staticmethod
    def validate(s: Any, vcpus: int) -> None:
        if not isinstance(s, dict) or not isinstance(s.get("regs"), dict):
            raise StateError("uart state is malformed")
        partial = s.get("partial")
        if not isinstance(partial, list) or len(partial) != vcpus:
            raise StateError("uart state has no line buffer per vCPU")

    def load(self, s: dict[str, Any]) -> None:
        self.regs.update({k: int(v) for k, v in s["regs"].items() if k in self.regs})
        self._partial = [bytearray(b) for b in s["partial"]]
        self.drive()


class ProbeDevice:
    """The probe: a 64-bit store of a record's guest-physical address reports the record.

    Unicorn delivers a 64-bit MMIO store as two 32-bit writes (offset 0, then offset 4) from
    the same instruction, so the low half is held per vCPU until the high half arrives; a pause
    cannot fall between them.

    A stop from another thread could make unicorn re-execute an MMIO store, so one report could
    arrive twice (the machine now stops vCPUs only at block starts, where this is not seen:
    docs/arm-state.md). As a guard, reports are never legitimately repeated (counters
    increase), so a record equal to the last one from the same vCPU is dropped; the last
    records travel with the state (`state()`/`load()`).
    """

    def __init__(self, log: ProbeLog, ram: memoryview, ram_base: int, vcpus: int) -> None:
        self._log = log
        self._ram = ram
        self._base = ram_base
        self._low: list[int | None] = [None] * vcpus
        self._last: list[bytes] = [b""] * vcpus

    def write(self, vcpu: int, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self._low[vcpu] = value
            return
        if offset == 4 and size == 4:
            low, self._low[vcpu] = self._low[vcpu], None
            if low is None:
                self._log.report(b"")
                return
            offset, value = 0, low | (value << 32)
        self._report(vcpu, offset, value)

    def _report(self, vcpu: int, offset: int, value: int) -> None:
        off = value - self._base
        if offset != 0 or off < 0 or off + RECORD.size > len(self._ram):
            self._log.report(b"")  # counted as a bad record
            return
        raw = bytes(self._ram[off : off + RECORD.size])
        if raw == self._last[vcpu]:
            return
        self._last[vcpu] = raw
        self._log.report(raw)

    def state(self) -> dict[str, Any]:
        return {"last": list(self._last)}

    @staticmethod
    def validate(s: Any, vcpus: int) -> None:
        last = s.get("last") if isinstance(s, dict) else None
        if not isinstance(last, list) or len(last) != vcpus:
            raise StateError("probe device state has no last record per vCPU")
        if not all(isinstance(b, bytes) for b in last):
            raise StateError("probe device state is malformed")

    def load(self, s: dict[str, Any]) -> None:
        self._last = list(s["last"])
