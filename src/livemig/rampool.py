"""RAM allocated ahead of an incoming migration (`livemig listen --prealloc SIZE`).

QEMU's `-mem-prealloc` counterpart. A destination otherwise allocates and zeroes every page of
the incoming machine while the pages arrive: on a nested host whose free memory goes back to
the outer host (virtio-balloon free page reporting), each first touch is a fault in the outer
hypervisor too, about 1 GB/s on one core, and it is the slowest part of round 1. With a pool,
that cost is paid once, before any migration, while the listener waits: the pool holds one
zero-filled RAM file (huge pages where `hugeshm` can make them), every page populated.

A pre-copy or stop-and-copy migration of a machine with at most SIZE bytes of RAM takes it
(trimmed to the machine's size); post-copy does not (userfaultfd needs RAM that starts as
holes), nor does a handover or a template clone (their RAM exists already). A migration that
took it and failed leaves it written: `refill()` makes a new one in the background. Once a
machine has arrived the listener takes no other, and `close()` gives back what was not taken.
"""

from __future__ import annotations

import mmap
import os
import threading
import time

from livemig.contract import BackingKind, MemoryBacking
from livemig.hugeshm import HugeUnavailable, open_huge
from livemig.memfd import populate_pages
from livemig.ram import host_address


class PoolError(OSError):
    """The pool's RAM could not be made or populated (the host cannot give it)."""


def make_populated(size: int) -> tuple[int, bool]:
    """A zero-filled RAM file of `size` bytes with every page allocated: (fd, huge pages)."""
    try:
        fd, huge = open_huge(size), True
    except HugeUnavailable:
        fd, huge = os.memfd_create("livemig-prealloc", os.MFD_CLOEXEC), False
        os.ftruncate(fd, size)
    try:
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            populate_pages(host_address(m), size)
        except OSError as e:
            raise PoolError(e.errno, f"populating {size >> 20} MiB of RAM: "
                                     f"{os.strerror(e.errno or 0)}") from e
        finally:
            m.close()
    except BaseException:
        os.close(fd)
        raise
    return fd, huge


class RamPool:
    """At most one populated RAM file of `size` bytes, for the next incoming machine."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.huge = False
        self.fill_s = 0.0  # how long the last fill took
        self._fd: int | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._filler: threading.Thread | None = None

    def fill(self) -> None:
        """Make the RAM file now (PoolError when the host cannot give it); a pool closed
        meanwhile frees it at once."""
        t0 = time.monotonic()
        fd, huge = make_populated(self.size)
        old: int | None = fd  # a pool closed meanwhile keeps nothing
        with self._lock:
            if not self._closed:
                old, self._fd, self.huge = self._fd, fd, huge
        self.fill_s = time.monotonic() - t0
        if old is not None:
            os.close(old)

    def refill(self) -> None:
        """Make a new RAM file in the background if the last one was taken (best effort: a
        host that cannot give it now leaves the pool empty, and migrations allocate as they go)."""
        with self._lock:
            if self._closed or self._fd is not None or (
                    self._filler is not None and self._filler.is_alive()):
                return
            self._filler = threading.Thread(target=self._refill, name="ram-pool", daemon=True)
            self._filler.start()

    def _refill(self) -> None:
        try:
            self.fill()
        except OSError:
            pass

    def take(self, size: int) -> MemoryBacking | None:
        """The pool's RAM for a machine of `size` bytes (the pool is then empty), or None when
        there is none ready or it is too small."""
        with self._lock:
            if self._fd is None or size > self.size:
                return None
            fd, self._fd = self._fd, None
        return MemoryBacking(BackingKind.PREPARED, (fd,))

    def close(self) -> None:
        """Free the RAM not taken, and any a refill is still making."""
        with self._lock:
            fd, self._fd, self._closed = self._fd, None, True
        if fd is not None:
            os.close(fd)
