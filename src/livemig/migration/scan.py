"""Finding the pages worth looking at, without touching the ones never written.

Reading a never-written page of a memfd allocates it, so scanning all of a large, mostly
empty RAM for zero pages costs a page fault per page. When RAM has an fd, `lseek` with
SEEK_DATA / SEEK_HOLE lists the ranges that hold data; holes read as zeroes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from livemig.contract import PAGE_SIZE, GuestMemory


def populated(memory: GuestMemory) -> np.ndarray:
    """Bool per page: may hold non-zero data (True everywhere when RAM has no usable fd)."""
    npages = memory.size // PAGE_SIZE
    fd = memory.fd
    if fd is None:
        return np.ones(npages, dtype=bool)
    try:
        if os.fstat(fd).st_size < memory.size:
            return np.ones(npages, dtype=bool)
        return _data_ranges(fd, memory.size, npages)
    except OSError:
        return np.ones(npages, dtype=bool)


def _data_ranges(fd: int, size: int, npages: int) -> np.ndarray:
    out = np.zeros(npages, dtype=bool)
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out[start // PAGE_SIZE : (end + PAGE_SIZE - 1) // PAGE_SIZE] = True
        pos = end
    return out


def iter_nonzero(
    ram_pages: np.ndarray, candidates: np.ndarray, chunk: int = 32768
) -> Iterator[np.ndarray]:
    """Yield arrays of non-zero page indices among `candidates` (bool per page), a chunk of
    at most `chunk` pages scanned at a time, in page order."""
    padded = np.concatenate(([0], candidates.view(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))
    for start, end in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        for a in range(start, end, chunk):
            b = min(end, a + chunk)
            yield np.flatnonzero(nonzero_in(ram_pages[a:b])) + a


def nonzero_in(pages: np.ndarray) -> np.ndarray:
    """Bool per page: holds a non-zero byte. A page whose first or last word is set is
    non-zero without reading the rest, so only the doubtful pages are scanned whole."""
    words = pages.view(np.uint64)
    nonzero = (words[:, 0] != 0) | (words[:, -1] != 0)
    doubtful = np.flatnonzero(~nonzero)
    if len(doubtful):
        nonzero[doubtful] = words[doubtful].any(axis=1)
    return nonzero


def nonzero_pages(ram_pages: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Indices of the non-zero pages among `candidates` (bool per page)."""
    found = list(iter_nonzero(ram_pages, candidates))
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
