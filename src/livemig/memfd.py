"""memfd helpers shared by the machines: giving RAM back to the host."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def punch_hole(fd: int, size: int) -> None:
    """Free every page of a memfd, keeping its size (best effort: it only returns memory)."""
    _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, size)


def punch_pages(fd: int, first: int, count: int, page_size: int = 4096) -> None:
    """Drop pages first..first+count of a memfd (they read as a hole again); OSError if the
    kernel refuses, since a caller relying on the hole must know."""
    if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, first * page_size,
                       count * page_size) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


MADV_DONTNEED = 4
MADV_POPULATE_WRITE = 23
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def populate_pages(address: int, length: int) -> None:
    """Allocate every page of a range of a mapping now, as writes would (MADV_POPULATE_WRITE,
    Linux 5.14; the GIL is released meanwhile); OSError when the kernel refuses."""
    if _libc.madvise(address, length, MADV_POPULATE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(POPULATE_WRITE): {os.strerror(err)}")


def unmap_pages(address: int, length: int) -> None:
    """Drop the page-table entries of a range of a shared memfd mapping (MADV_DONTNEED): the
    pages stay in the memfd, the next access faults them in again."""
    if _libc.madvise(address, length, MADV_DONTNEED) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(DONTNEED): {os.strerror(err)}")


def release(mapping: mmap.mmap, fd: int | None, size: int) -> None:
    """Unmap RAM; when a view of it is still alive somewhere the mapping has to stay, but
    punching the whole file frees its pages all the same (the mapping then reads zeroes)."""
    try:
        mapping.close()
    except BufferError:
        if fd is not None:
            punch_hole(fd, size)
