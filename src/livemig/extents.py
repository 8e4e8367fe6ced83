"""Page extents: where a memfd holds data, and runs of set pages in a bitmap.

Shared by the engine (what to scan and send) and the machines (what to compare for dirty
tracking); it knows nothing of either.
"""

from __future__ import annotations

import os

import numpy as np

from livemig.contract import PAGE_SIZE


def data_pages(fd: int, size: int) -> list[tuple[int, int]]:
    """(first page, page count) of every range of the file that holds data (SEEK_DATA).

    A hole was never written: it reads as zeroes, and reading it through a shared mapping
    would only allocate it.
    """
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        first = start // PAGE_SIZE
        out.append((first, (end + PAGE_SIZE - 1) // PAGE_SIZE - first))
        pos = end
    return out


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first page, page count) of every run of True in a bool-per-page array."""
    m = np.ascontiguousarray(mask, dtype=bool)
    if not len(m):
        return []
    # where the value changes, on bools (no padded int copy of the whole mask)
    change = np.flatnonzero(m[1:] != m[:-1]) + 1
    edges = np.concatenate(([0] if m[0] else [], change, [len(m)] if m[-1] else []))
    edges = edges.astype(np.int64).tolist()
    return [(a, b - a) for a, b in zip(edges[::2], edges[1::2], strict=True)]
