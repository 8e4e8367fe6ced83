"""Multiboot v1 loader: ELF32 (or a.out-kludge) images, command line, memory map.

The machine starts the boot CPU in 32-bit protected mode, paging off, at the image's entry
with EAX = 0x2BADB002 and EBX = the multiboot information structure, as the spec requires.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from livemig.contract import ImageError
from livemig.machine.memory import GuestRam

HEADER_MAGIC = 0x1BADB002
BOOT_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192

FLAG_AOUT_KLUDGE = 1 << 16

INFO_MEM = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MMAP = 1 << 6
INFO_LOADER_NAME = 1 << 9

# Where the loader puts what it hands to the guest: low conventional memory, below 0x7c00,
# away from the 0x8000 area guests use for their AP trampoline.
INFO_ADDR = 0x1000
CMDLINE_ADDR = 0x1100
MMAP_ADDR = 0x1900
LOADER_NAME_ADDR = 0x1F00
CMDLINE_MAX = 0x7FF

E820_RAM = 1
E820_RESERVED = 2


@dataclass(frozen=True)
class LoadedImage:
    entry: int
    info_addr: int
    end: int  # first byte above the image


def _find_header(data: bytes) -> tuple[int, int]:
    for off in range(0, min(len(data), SEARCH_LIMIT) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off, flags
    raise ImageError("not a multiboot image: no multiboot v1 header in its first 8 KiB")


def _load_elf32(data: bytes, ram: GuestRam) -> tuple[int, int]:
    if data[4] != 1 or data[5] != 1:
        raise ImageError("multiboot image is ELF but not ELF32 little-endian")
    (e_type, e_machine, _v, e_entry, e_phoff, _sh, _fl, _eh, e_phentsize,
     e_phnum) = struct.unpack_from("<HHIIIIIHHH", data, 16)
    if e_machine != 3:
        raise ImageError(f"multiboot ELF is for machine {e_machine}, not i386 (3)")
    end = 0
    for i in range(e_phnum):
        p_type, p_off, _va, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIIIII", data, e_phoff + i * e_phentsize)
        if p_type != 1 or p_memsz == 0:
            continue
        if p_off + p_filesz > len(data):
            raise ImageError("multiboot ELF segment extends past the end of the file")
        try:
            ram.write_phys(p_paddr, data[p_off:p_off + p_filesz])
            ram.write_phys(p_paddr + p_filesz, bytes(p_memsz - p_filesz))
        except ValueError as e:
            raise ImageError(f"image segment at {p_paddr:#x} does not fit in RAM") from e
        end = max(end, p_paddr + p_memsz)
    return e_entry, end


def _load_aout(data: bytes, hdr_off: int, ram: GuestRam) -> tuple[int, int]:
    header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from(
        "<IIIII", data, hdr_off + 12)
    file_off = hdr_off - (header_addr - load_addr)
    size = (load_end - load_addr) if load_end else len(data) - file_off
    if file_off < 0 or file_off + size > len(data):
        raise ImageError("multiboot a.out header addresses do not match the file")
    try:
        ram.write_phys(load_addr, data[file_off:file_off + size])
        if bss_end > load_addr + size:
            ram.write_phys(load_addr + size, bytes(bss_end - load_addr - size))
    except ValueError as e:
        raise ImageError(f"image at {load_addr:#x} does not fit in RAM") from e
    return entry, max(bss_end, load_addr + size)


def _memory_map(ram: GuestRam) -> bytes:
    entries = [(0, 0x9FC00, E820_RAM), (0x9FC00, 0x400, E820_RESERVED),
               (0xF0000, 0x10000, E820_RESERVED)]
    for s in ram.slots:
        start = max(s.guest_phys, 0x100000)
        entries.append((start, s.guest_phys + s.size - start, E820_RAM))
    return b"".join(struct.pack("<IQQI", 20, base, length, kind)
                    for base, length, kind in entries)


def load(path: str, cmdline: str, ram: GuestRam) -> LoadedImage:
    """Load a multiboot v1 image into RAM and write the multiboot information."""
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"guest image {path} does not exist")
    data = p.read_bytes()
    hdr_off, flags = _find_header(data)
    if flags & FLAG_AOUT_KLUDGE:
        entry, end = _load_aout(data, hdr_off, ram)
    elif data[:4] == b"\x7fELF":
        entry, end = _load_elf32(data, ram)
    else:
        raise ImageError("multiboot image is neither ELF nor has a.out load addresses")
    raw_cmd = cmdline.encode()[:CMDLINE_MAX] + b"\0"
    mmap = _memory_map(ram)
    low = ram.slots[0].size
    # flags, mem_lower, mem_upper, boot_device, cmdline, mods (2), syms (4), mmap (2)
    info = struct.pack("<13I", INFO_MEM | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME,
                       640, (low - 0x100000) // 1024, 0, CMDLINE_ADDR, 0, 0, 0, 0, 0, 0,
                       len(mmap), MMAP_ADDR)
    info += bytes(64 - len(info)) + struct.pack("<I", LOADER_NAME_ADDR)
    ram.write_phys(CMDLINE_ADDR, raw_cmd)
    ram.write_phys(MMAP_ADDR, mmap)
    ram.write_phys(LOADER_NAME_ADDR, b"livemig\0")
    ram.write_phys(INFO_ADDR, info)
    return LoadedImage(entry, INFO_ADDR, end)
