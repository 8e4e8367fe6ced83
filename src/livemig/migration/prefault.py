"""Destination-side prefaulting: take RAM's first-touch page faults off the receive path.

Writing a received page into never-touched RAM costs a page fault (several microseconds each
on a nested host, more than the copy itself). The source tells, in CONFIG, which page ranges
hold data; a background thread asks the kernel to populate exactly those ranges
(MADV_POPULATE_WRITE, without the GIL) ahead of the pages arriving in the same order. RAM the
source never used stays unallocated, so the destination's footprint matches the source's.
"""

from __future__ import annotations

import ctypes
import threading

from livemig.contract import PAGE_SIZE
from livemig.memfd import populate_pages

CHUNK = 2 << 20  # bytes populated per call: small enough to stop promptly


class Prefaulter:
    """Populates page ranges of a RAM mapping in a background thread until done or stopped."""

    def __init__(self, ram: memoryview, extents: list[tuple[int, int]]) -> None:
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(ram))
        self._size = ram.nbytes
        self._extents = extents
        self._stop = threading.Event()
        self.populated_bytes = 0
        self._thread = threading.Thread(target=self._run, name="prefault", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for first, count in self._extents:
            start = first * PAGE_SIZE
            end = min(start + count * PAGE_SIZE, self._size)
            for a in range(start, end, CHUNK):
                if self._stop.is_set():
                    return
                n = min(CHUNK, end - a)
                try:
                    populate_pages(self._base + a, n)
                except OSError:
                    return  # an older kernel: the receive path takes the faults itself
                self.populated_bytes += n

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
