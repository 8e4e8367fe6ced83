"""A PCI bus reached through configuration mechanism #1 (I/O ports 0xCF8 and 0xCFC-0xCFF).

Bus 0 only; each device is one function with a 256-byte configuration space and one I/O BAR
(BAR0). As on real hardware no firmware assigns the BAR: the guest sizes it (writes all ones,
reads the size mask), places it, and turns I/O decoding on in COMMAND before the device
answers on its ports. The address register (0xCF8) is state the guest wrote and migrates.
"""

from __future__ import annotations

import struct
from typing import Any

from livemig.contract import StateError

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
CFG_COMMAND = 0x04
CFG_BAR0 = 0x10
CFG_INTERRUPT_LINE = 0x3C
CMD_IO = 0x1
CMD_MASTER = 0x4
ENABLE = 0x8000_0000
CONFIG_SIZE = 256


class PciDevice:
    """One PCI function: its configuration space and an I/O BAR of `bar_size` bytes."""

    bar_size = 0x20

    def __init__(self, vendor: int, device: int, class_code: int, subsys_vendor: int,
                 subsys: int, revision: int = 0) -> None:
        c = bytearray(CONFIG_SIZE)
        struct.pack_into("<HH", c, 0, vendor, device)
        struct.pack_into("<I", c, 0x08, (class_code << 8) | revision)
        struct.pack_into("<I", c, CFG_BAR0, 1)  # I/O space BAR, unassigned
        struct.pack_into("<HH", c, 0x2C, subsys_vendor, subsys)
        c[0x3D] = 1  # INTA#: declared, never raised (the guest polls)
        self.config = c

    def io_base(self) -> int | None:
        """Where BAR0 decodes, or None while I/O decoding is off or the BAR is unassigned."""
        if not self.config[CFG_COMMAND] & CMD_IO:
            return None
        base = struct.unpack_from("<I", self.config, CFG_BAR0)[0] & 0xFFFC
        return base or None

    def config_read(self, off: int, size: int) -> int:
        return int.from_bytes(self.config[off:off + size], "little")

    def config_write(self, off: int, size: int, value: int) -> None:
        """Only COMMAND, BAR0 and the interrupt line are writable; the rest is read-only."""
        for i in range(size):
            self._write_byte(off + i, (value >> (8 * i)) & 0xFF)

    def _write_byte(self, off: int, v: int) -> None:
        if off == CFG_COMMAND:
            self.config[off] = v & (CMD_IO | CMD_MASTER)
        elif CFG_BAR0 <= off < CFG_BAR0 + 4:
            mask = ((~(self.bar_size - 1)) & 0xFFFF_FFFC) >> (8 * (off - CFG_BAR0)) & 0xFF
            self.config[off] = (v & mask) | (1 if off == CFG_BAR0 else 0)
        elif off == CFG_INTERRUPT_LINE:
            self.config[off] = v

    def io_read(self, off: int, size: int) -> int:
        raise NotImplementedError

    def io_write(self, off: int, size: int, value: int) -> None:
        raise NotImplementedError


class PciBus:
    """Bus 0: devices by slot, the guest's CONFIG_ADDRESS, and I/O dispatch to BARs."""

    def __init__(self) -> None:
        self.devices: dict[int, PciDevice] = {}
        self.address = 0

    def add(self, slot: int, dev: PciDevice) -> None:
        self.devices[slot] = dev

    def handles(self, port: int) -> bool:
        return CONFIG_ADDRESS <= port < CONFIG_ADDRESS + 4 or CONFIG_DATA <= port < CONFIG_DATA + 4

    def _selected(self) -> tuple[PciDevice | None, int]:
        a = self.address
        if not a & ENABLE or (a >> 16) & 0xFF or (a >> 8) & 0x7:
            return None, 0
        return self.devices.get((a >> 11) & 0x1F), a & 0xFC

    def out(self, port: int, size: int, value: int) -> None:
        if port == CONFIG_ADDRESS and size == 4:
            self.address = value & 0x80FF_FFFC
        elif port >= CONFIG_DATA:
            dev, reg = self._selected()
            if dev is not None:
                dev.config_write(reg + port - CONFIG_DATA, size, value)

    def inp(self, port: int, size: int) -> int:
        if port == CONFIG_ADDRESS and size == 4:
            return self.address
        if port >= CONFIG_DATA:
            dev, reg = self._selected()
            if dev is not None:
                return dev.config_read(reg + port - CONFIG_DATA, size)
        return (1 << (8 * size)) - 1

    def io_device(self, port: int) -> tuple[PciDevice, int] | None:
        """The device whose BAR decodes `port`, and the offset into it."""
        for dev in self.devices.values():
            base = dev.io_base()
            if base is not None and base <= port < base + dev.bar_size:
                return dev, port - base
        return None

    def save(self) -> dict[str, Any]:
        return {"address": self.address}

    @staticmethod
    def validate(state: object) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("address"), int):
            raise StateError("device state lacks the PCI bus address register")

    def load(self, state: dict[str, Any]) -> None:
        self.address = int(state["address"]) & 0x80FF_FFFC
