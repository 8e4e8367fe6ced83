"""Image loader of the ARMv8 board: ELF64 AArch64 (PT_LOAD by physical address) or flat binary."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from livemig.contract import ImageError

RAM_BASE = 0x4000_0000
FLAT_LOAD = RAM_BASE + 0x8_0000  # where a flat binary goes and starts (like Linux's text offset)
CMDLINE_ADDR = RAM_BASE + 0x1000  # the command line, NUL-terminated, at most CMDLINE_MAX bytes
CMDLINE_MAX = 4095
_RESERVED_END = RAM_BASE + 0x2000  # nothing of an image may overlap the command-line page

_EM_AARCH64 = 183
_PT_LOAD = 1


@dataclass
class Loaded:
    entry: int
    segments: list[tuple[int, int]]  # (guest-physical start, size in memory)


def load_image(path: str, ram: memoryview) -> Loaded:
    """Copy the image at `path` into RAM (offset 0 = RAM_BASE); return its entry point."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"cannot read guest image {path!r}: {e.strerror}") from e
    if data[:4] == b"\x7fELF":
        return _load_elf(path, data, ram)
    _place(path, ram, FLAT_LOAD, data, len(data))
    return Loaded(FLAT_LOAD, [(FLAT_LOAD, len(data))])


def _load_elf(path: str, data: bytes, ram: memoryview) -> Loaded:
    if len(data) < 64 or data[4] != 2 or data[5] != 1:
        raise ImageError(f"{path}: not a little-endian ELF64 image")
    (machine,) = struct.unpack_from("<H", data, 18)
    if machine != _EM_AARCH64:
        raise ImageError(f"{path}: ELF machine {machine} is not AArch64 ({_EM_AARCH64})")
    entry, phoff = struct.unpack_from("<QQ", data, 24)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    segs = []
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 56 > len(data):
            raise ImageError(f"{path}: program header {i} is truncated")
        p_type, _flags, p_off, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", data, off
        )
        if p_type != _PT_LOAD or p_memsz == 0:
            continue
        if p_off + p_filesz > len(data) or p_filesz > p_memsz:
            raise ImageError(f"{path}: segment {i} lies outside the file")
        _place(path, ram, p_paddr, data[p_off : p_off + p_filesz], p_memsz)
        segs.append((p_paddr, p_memsz))
    if not segs:
        raise ImageError(f"{path}: no loadable segment")
    if not any(a <= entry < a + n for a, n in segs):
        raise ImageError(f"{path}: entry point {entry:#x} is outside the loaded segments")
    return Loaded(entry, segs)


def _place(path: str, ram: memoryview, addr: int, content: bytes, memsz: int) -> None:
    if addr < _RESERVED_END or addr + memsz > RAM_BASE + len(ram):
        raise ImageError(
            f"{path}: segment {addr:#x}+{memsz:#x} does not fit RAM "
            f"{_RESERVED_END:#x}..{RAM_BASE + len(ram):#x}"
        )
    off = addr - RAM_BASE
    ram[off : off + len(content)] = content
    ram[off + len(content) : off + memsz] = bytes(memsz - len(content))


def place_cmdline(cmdline: str, ram: memoryview) -> int:
    """Write the command line at CMDLINE_ADDR; return its address."""
    raw = cmdline.encode()
    if len(raw) > CMDLINE_MAX or b"\0" in raw:
        raise ImageError(f"command line must be at most {CMDLINE_MAX} bytes without NUL")
    off = CMDLINE_ADDR - RAM_BASE
    ram[off : off + len(raw) + 1] = raw + b"\0"
    return CMDLINE_ADDR
