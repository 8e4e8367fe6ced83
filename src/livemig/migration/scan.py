"""Finding the pages worth looking at, without touching the ones never written.

Reading a never-written page of a memfd allocates it, so scanning all of a large, mostly
empty RAM for zero pages costs a page fault per page. When RAM has an fd, `lseek` with
SEEK_DATA / SEEK_HOLE lists the ranges that hold data; holes read as zeroes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from livemig.contract import PAGE_SIZE, GuestMemory
from livemig.extents import runs


def populated(memory: GuestMemory) -> np.ndarray:
    """Bool per page: may hold non-zero data (True everywhere when that cannot be known)."""
    try:
        return memory.data_pages()
    except OSError:
        return np.ones(memory.size // PAGE_SIZE, dtype=bool)


def iter_nonzero(
    ram_pages: np.ndarray, candidates: np.ndarray, chunk: int = 32768
) -> Iterator[np.ndarray]:
    """Yield arrays of non-zero page indices among `candidates` (bool per page), a chunk of
    at most `chunk` pages scanned at a time, in page order."""
    for start, count in runs(candidates):
        end = start + count
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
