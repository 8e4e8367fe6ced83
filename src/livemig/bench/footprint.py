"""Host memory taken by machine processes: proportional set size (PSS) and MemAvailable.

PSS divides each shared page among the processes mapping it, so the PSS of N clones of one
template adds up to the template's pages once plus each clone's own pages, while N ordinary
machines count every page N times.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import re
from pathlib import Path

import numpy as np

_RAM_MAPPING = re.compile(r"memfd:livemig-(arm-)?ram|/memory(\s\(deleted\))?$")
_MEMFD = re.compile(r"memfd:livemig-(arm-)?ram")


def _kib_field(text: str, name: str) -> int:
    m = re.search(rf"^{name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def rollup_pss(pid: int) -> int:
    """Bytes: the process's whole PSS (`/proc/PID/smaps_rollup`)."""
    return _kib_field(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss")


def _ram_fields(pid: int) -> list[tuple[str, dict[str, int]]]:
    """(mapping line, its size fields in bytes) of each guest-RAM mapping of process `pid`."""
    out: list[tuple[str, dict[str, int]]] = []
    current: dict[str, int] | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            current = {} if _RAM_MAPPING.search(line) else None
            if current is not None:
                out.append((line, current))
        elif current is not None and line.endswith(" kB"):
            key, _, rest = line.partition(":")
            current[key] = int(rest.split()[0]) * 1024
    return out


def ram_pss(pid: int) -> int:
    """Bytes: PSS of the process's guest-RAM mapping(s) only (the RAM memfd, or a
    template's memory file for a clone), from `/proc/PID/smaps`."""
    return sum(f.get("Pss", 0) for _, f in _ram_fields(pid))


def ram_own(pid: int) -> int:
    """Bytes of guest RAM the process holds by itself: all that is resident of a RAM memfd,
    only the copied (anonymous) pages of a template mapping. A template's page cache is not
    counted here (see `resident`), since it is there once for all its clones."""
    return sum(f.get("Rss", 0) if _MEMFD.search(line) else f.get("Anonymous", 0)
               for line, f in _ram_fields(pid))


def resident(path: str | Path) -> int:
    """Bytes of the file at `path` held in the host's page cache (mincore)."""
    size = os.stat(path).st_size
    if size == 0:
        return 0
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = np.zeros(pages, dtype=np.uint8)
    with open(path, "rb") as f:
        # A private writable mapping only to get its address; nothing is written to it.
        m = mmap.mmap(f.fileno(), size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            anchor = ctypes.c_char.from_buffer(m)
            try:
                if _libc.mincore(ctypes.addressof(anchor), size, vec.ctypes.data) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            finally:
                del anchor
        finally:
            m.close()
    return int(np.count_nonzero(vec & 1)) * mmap.PAGESIZE


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def mem_available() -> int:
    """Bytes: the host's MemAvailable."""
    return _kib_field(Path("/proc/meminfo").read_text(), "MemAvailable")
