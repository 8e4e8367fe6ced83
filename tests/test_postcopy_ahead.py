"""Hybrid's head start on post-copy (postcopy_ahead.py): PREPARE unmaps the owed pages that
the destination's RAM memfd holds while the source's guest still runs, and STATE then
unmaps only the rest; every owed page present here ends up unmapped, its data kept."""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from livemig.contract import PAGE_SIZE
from livemig.migration.postcopy_ahead import PrepareAhead
from livemig.migration.postcopy_dest import PostcopyReceiver

NPAGES = 64


class MemfdRam:
    """Just enough of GuestMemory: RAM in a memfd, mapped shared."""

    def __init__(self) -> None:
        self.size = NPAGES * PAGE_SIZE
        self.page_size = PAGE_SIZE
        self.fd: int | None = os.memfd_create("test-ram")
        os.ftruncate(self.fd, self.size)
        self._map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED)
        self.base = int(np.frombuffer(self._map, np.uint8).ctypes.data)

    def view(self) -> memoryview:
        return memoryview(self._map)

    def write(self, pages: list[int]) -> None:
        for p in pages:
            self._map[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = bytes([p + 1]) * PAGE_SIZE

    def mapped(self) -> set[int]:
        """Pages with a page-table entry in this process (/proc/self/pagemap bit 63)."""
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(self.base // PAGE_SIZE * 8)
            entries = struct.unpack(f"<{NPAGES}Q", f.read(NPAGES * 8))
        return {i for i, e in enumerate(entries) if e >> 63}

    def stored(self, page: int) -> int:
        """The first byte of `page` as the memfd holds it (not through the mapping)."""
        assert self.fd is not None
        return os.pread(self.fd, 1, page * PAGE_SIZE)[0]

    def close(self) -> None:
        self._map.close()
        if self.fd is not None:
            os.close(self.fd)


def _mask(pages: list[int]) -> np.ndarray:
    m = np.zeros(NPAGES, dtype=bool)
    m[pages] = True
    return m


def test_hint_unmaps_owed_present_pages_and_keeps_their_data() -> None:
    ram = MemfdRam()
    try:
        ram.write([1, 2, 3, 10, 11])
        ahead = PrepareAhead(ram, placed=7)  # type: ignore[arg-type]
        assert np.flatnonzero(ahead.present).tolist() == [1, 2, 3, 10, 11]
        assert ahead.hint(_mask([2, 3, 4, 10])) == 3  # page 4 is a hole: nothing to unmap
        assert ram.mapped() == {1, 11}
        assert [ram.stored(p) for p in (2, 3, 10)] == [3, 4, 11]
        assert ahead.hint(_mask([2, 3, 11])) == 1  # only what no hint named yet
        assert ram.mapped() == {1}
        assert ahead.valid(7) and not ahead.valid(8)  # a page placed since voids it
    finally:
        ram.close()


def test_state_unmaps_what_prepare_did_not_name() -> None:
    """At STATE more pages are owed than PREPARE named (dirtied after it): every owed page
    present here is unmapped before the guest may run, the others stay mapped."""
    ram = MemfdRam()
    pc: PostcopyReceiver | None = None
    try:
        ram.write([1, 2, 3, 10, 11, 20])
        ahead = PrepareAhead(ram, placed=0)  # type: ignore[arg-type]
        ahead.hint(_mask([2, 3]))
        pc = PostcopyReceiver(ram, _mask([2, 3, 11, 30]), None, 0.0)  # type: ignore[arg-type]
        pc.prepare(ahead)
        assert ram.mapped() == {1, 10, 20}
        assert pc.placer is not None
        if pc.placer.alias is not None:  # MINOR faults: stale pages are rewritten in place
            assert np.flatnonzero(pc.placer.minor).tolist() == [2, 3, 11]
    finally:
        if pc is not None:
            pc.close()
        ram.close()
