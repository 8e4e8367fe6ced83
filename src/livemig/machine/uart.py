"""A 16550 UART on I/O ports, polled: enough for a console, with its write-only registers kept.

The guest's writes to registers it cannot read back (FCR; THR) are recorded as they happen, the
trap-and-log method of the bare-metal migration paper, so the whole device state migrates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from livemig.contract import StateError

COM1_BASE = 0x3F8

LSR_THRE = 0x20
LSR_TEMT = 0x40
LCR_DLAB = 0x80


@dataclass
class UartRegs:
    """Programmer-visible state; `fcr` is write-only and known only from the guest's writes."""

    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    scr: int = 0
    dll: int = 0x0C
    dlm: int = 0
    fcr: int = 0


class Uart16550:
    """COM port emulation; bytes the guest sends go to `sink` a line at a time."""

    def __init__(self, sink: Callable[[bytes], None] | None, base: int = COM1_BASE) -> None:
        self.base = base
        self.regs = UartRegs()
        self._sink = sink
        self._line = bytearray()

    def handles(self, port: int) -> bool:
        return self.base <= port < self.base + 8

    def write(self, port: int, value: int) -> None:
        off, r, v = port - self.base, self.regs, value & 0xFF
        dlab = bool(r.lcr & LCR_DLAB)
        if off == 0:
            if dlab:
                r.dll = v
            else:
                self._emit(v)
        elif off == 1:
            if dlab:
                r.dlm = v
            else:
                r.ier = v & 0x0F
        elif off == 2:
            r.fcr = v
        elif off == 3:
            r.lcr = v
        elif off == 4:
            r.mcr = v & 0x1F
        elif off == 7:
            r.scr = v

    def read(self, port: int) -> int:
        off, r = port - self.base, self.regs
        dlab = bool(r.lcr & LCR_DLAB)
        if off == 0:
            return r.dll if dlab else 0
        if off == 1:
            return r.dlm if dlab else r.ier
        if off == 2:
            return 0xC1 if r.fcr & 1 else 0x01  # no interrupt pending; FIFO flag mirrors FCR
        if off == 3:
            return r.lcr
        if off == 4:
            return r.mcr
        if off == 5:
            return LSR_THRE | LSR_TEMT
        if off == 6:
            return 0xB0  # DCD, DSR, CTS: a terminal is always there
        return r.scr

    def _emit(self, byte: int) -> None:
        self._line.append(byte)
        if byte == 0x0A or len(self._line) >= 4096:
            self.flush()

    def flush(self) -> None:
        if self._line and self._sink is not None:
            self._sink(bytes(self._line))
        self._line.clear()

    def save(self) -> dict[str, Any]:
        return {**asdict(self.regs), "pending": bytes(self._line)}

    @staticmethod
    def validate(state: object) -> None:
        """Raise StateError naming what is wrong with a saved UART map."""
        if not isinstance(state, dict):
            raise StateError("device state lacks the UART")
        for k in asdict(UartRegs()):
            v = state.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFF:
                raise StateError(f"UART state field {k!r} is missing or not a register value")
        if not isinstance(state.get("pending", b""), bytes):
            raise StateError("UART state field 'pending' is not a byte string")

    def load(self, state: dict[str, Any]) -> None:
        self.regs = UartRegs(**{k: int(state[k]) for k in asdict(UartRegs())})
        self._line = bytearray(state.get("pending", b""))
