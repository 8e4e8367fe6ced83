"""Guest RAM of the ARMv8 board: a memfd mapping with dirty tracking by shadow comparison.

Unicorn gives no cheap per-page write notification (a Python hook on every store is far too
slow, `mem_protect` costs ~10 ms a fault), so `fetch_dirty` compares RAM against a shadow copy
taken at the previous fetch, a chunk of pages at a time with numpy, and refreshes the shadow of
the pages found changed. A page is reported when its contents differ from the last fetch; a
write that leaves a page byte-for-byte as it was is not (it need not be migrated either).

Race-free against running vCPUs: a page is copied into the shadow after being found different
and before the caller reads it, so the caller never sends older contents than the shadow holds;
a write that lands after the comparison is found at the next fetch.
"""

from __future__ import annotations

import ctypes

import numpy as np

from livemig.contract import PAGE_SIZE, ConfigError, MemoryBacking
from livemig.extents import runs
from livemig.ram import RamBacked, open_ram

_CHUNK_PAGES = 1024  # 4 MiB per comparison step: stays in cache, keeps temporaries small


class ArmMemory(RamBacked):
    """Guest RAM (GuestMemory): one MAP_SHARED memfd mapping, handed to unicorn by pointer."""

    page_size = PAGE_SIZE

    def __init__(self, size: int, name: str = "livemig-arm-ram",
                 backing: MemoryBacking | None = None) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ConfigError(f"memory size {size} is not a positive multiple of {PAGE_SIZE}")
        self.size = size
        self._ram = open_ram(size, backing or MemoryBacking(), name)
        self.fd: int | None = self._ram.fd
        self._mm = self._ram.map
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(self._mm)
        self.pages = size // PAGE_SIZE
        self._words = np.frombuffer(self._mm, dtype=np.uint64).reshape(self.pages, PAGE_SIZE // 8)
        self._shadow: np.ndarray | None = None
        self._tmp = np.empty((_CHUNK_PAGES, PAGE_SIZE // 8), dtype=bool)

    @property
    def address(self) -> int:
        """Host address of the mapping (what unicorn's `mem_map_ptr` is given)."""
        assert self._anchor is not None, "memory is closed"
        return ctypes.addressof(self._anchor)

    def view(self) -> memoryview:
        """Writable host mapping of all of RAM; byte i is guest RAM offset i."""
        return memoryview(self._mm)

    def start_dirty_log(self) -> None:
        """Every page counts as clean from now (takes a shadow copy of RAM: size bytes)."""
        # Only data ranges are copied: reading a memfd hole would allocate it for nothing.
        self._shadow = np.zeros_like(self._words)
        for lo, hi in self._chunks():
            self._shadow[lo:hi] = self._words[lo:hi]

    def fetch_dirty(self) -> np.ndarray:
        """Bool per page: contents changed since the last fetch (or start); clears."""
        if self._shadow is None:
            raise RuntimeError("dirty logging is not started")
        out = np.zeros(self.pages, dtype=bool)
        ram, shadow, tmp = self._words, self._shadow, self._tmp
        for lo, hi in self._chunks():
            t = tmp[: hi - lo]
            np.not_equal(ram[lo:hi], shadow[lo:hi], out=t)
            changed = t.view(np.uint64).reshape(hi - lo, -1).any(axis=1)
            if changed.any():
                idx = np.flatnonzero(changed) + lo
                shadow[idx] = ram[idx]
                out[idx] = True
        return out

    def _chunks(self) -> list[tuple[int, int]]:
        """Page ranges worth comparing, at most _CHUNK_PAGES each: those holding data.

        A hole of the memfd (SEEK_HOLE) was never written since the machine was made, so it
        equals its shadow (zero) and need not be read.
        """
        if self._anchor is None:
            return []
        return [(lo, min(first + count, lo + _CHUNK_PAGES))
                for first, count in runs(self._ram.data_mask())
                for lo in range(first, first + count, _CHUNK_PAGES)]


    def stop_dirty_log(self) -> None:
        self._shadow = None

    def close(self) -> None:
        """Unmap and close the memfd; unicorn must no longer use the pointer."""
        self._shadow = None
        if self._anchor is not None:
            self._anchor = None
            del self._words
            self._ram.close()
        self.fd = None
