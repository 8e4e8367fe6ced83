"""Hybrid's switch to post-copy, prepared at the destination before the source pauses.

Post-copy needs every owed page that the destination's RAM memfd holds (sent in a pre-copy
round, dirtied since) unmapped before the guest runs here, so that the guest's first touch
faults instead of reading stale data (postcopy_dest.PostcopyReceiver.prepare). Finding those
pages (a SEEK_DATA walk of the memfd) and unmapping them (MADV_DONTNEED) takes milliseconds
per hundred MiB; done at STATE it all counts as downtime.

With PREPARE (docs/protocol.md) the source says, once its live rounds are over and while its
guest still runs, which pages will be owed: the destination then walks the memfd and unmaps
them at once (`PrepareAhead.hint`), and at STATE only the pages dirtied since the last hint
remain to be unmapped. This is only a head start: which pages are present here must not
change between the walk and STATE, so any page placed after it makes it void (`valid`), and
STATE is then prepared from scratch. Unmapping a page that is not owed in the end costs one
fault later and loses nothing: its contents stay in the memfd.
"""

from __future__ import annotations

import numpy as np

from livemig.contract import PAGE_SIZE, GuestMemory
from livemig.extents import data_pages, runs
from livemig.memfd import unmap_pages
from livemig.migration.errors import MigrationError


def present_pages(fd: int, size: int) -> np.ndarray:
    """Bool per page of a RAM memfd of `size` bytes: the page holds data (it is no hole)."""
    present = np.zeros(size // PAGE_SIZE, dtype=bool)
    for first, count in data_pages(fd, size):
        present[first : first + count] = True
    return present


def unmap_runs(base: int, mask: np.ndarray) -> None:
    """MADV_DONTNEED every run of pages set in `mask`, in the mapping at address `base`."""
    if not mask.any():
        return
    for first, count in runs(mask):
        unmap_pages(base + first * PAGE_SIZE, count * PAGE_SIZE)


class PrepareAhead:
    """The destination's head start on post-copy: which pages its memfd held when PREPARE
    came (`present`), and which of those are still mapped here (`mapped`: not unmapped for
    a PREPARE)."""

    def __init__(self, memory: GuestMemory, placed: int) -> None:
        """`placed`: the destination's count of page batches placed so far; the head start
        holds while that count stays the same."""
        if memory.fd is None:
            raise MigrationError("destination RAM has no memfd: post-copy is not possible")
        # The address only, no view: the machine's RAM must stay free to close.
        self.base = int(np.frombuffer(memory.view(), dtype=np.uint8).ctypes.data)
        self.placed = placed
        self.present = present_pages(memory.fd, memory.size)
        self.mapped = self.present.copy()

    def valid(self, placed: int) -> bool:
        """Whether `present` still holds: no page was placed since the walk."""
        return placed == self.placed

    def hint(self, owed: np.ndarray) -> int:
        """Unmap the present pages among `owed` (bool per page) not unmapped yet; returns
        how many were."""
        todo = self.mapped & owed
        unmap_runs(self.base, todo)
        self.mapped &= ~todo
        return int(np.count_nonzero(todo))
