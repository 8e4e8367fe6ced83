"""Guest RAM mappings made from a `MemoryBacking`, shared by the machines (x86 and arm).

A fresh machine maps a new memfd; an adopted one maps the memfd another process handed over;
a clone maps a template's memory file MAP_PRIVATE, so that the pages its guest never writes
stay in the host's page cache, shared by every clone of that template. Which pages a clone has
written ("deltas") is read from `/proc/self/pagemap`: a written page of a private file mapping
is an anonymous page (present and not file-backed, or swapped out).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

from livemig.contract import PAGE_SIZE, BackingKind, ConfigError, MemoryBacking
from livemig.extents import data_pages
from livemig.memfd import release

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE = 1 << 61  # file page or shared anonymous


def host_address(mapping: mmap.mmap) -> int:
    """Address of a mapping in this process."""
    import ctypes

    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


@dataclass
class RamMapping:
    """One machine's RAM mapping and what backs it."""

    size: int
    map: mmap.mmap
    fd: int | None  # a memfd that can be handed over (None: a private template mapping)
    file_fd: int | None  # the template memory file of a clone
    owned: bool  # this process alone holds the pages: closing may free them
    template_path: str = ""

    def data_mask(self) -> np.ndarray:
        """Bool per page: may hold non-zero data."""
        out = np.zeros(self.size // PAGE_SIZE, dtype=bool)
        src = self.fd if self.fd is not None else self.file_fd
        if src is None:
            return ~out
        for first, count in data_pages(src, self.size):
            out[first:first + count] = True
        deltas = self.template_deltas()
        if deltas is not None:
            out |= deltas
        return out

    def template_deltas(self) -> np.ndarray | None:
        """Bool per page: written since the template was mapped (None: not a clone)."""
        if self.file_fd is None:
            return None
        entries = pagemap(host_address(self.map), self.size // PAGE_SIZE)
        anon = ((entries & PM_PRESENT) != 0) & ((entries & PM_FILE) == 0)
        return anon | ((entries & PM_SWAPPED) != 0)

    def hand_over(self) -> list[int]:
        """The memfd for another process; from now on closing never frees its pages."""
        if self.fd is None:
            return []
        self.owned = False
        return [self.fd]

    def close(self) -> None:
        """Unmap and close; free the pages only if no other process may be using them."""
        if self.owned:
            release(self.map, self.fd, self.size)
        else:
            try:
                self.map.close()
            except BufferError:
                pass  # a view is alive somewhere: the mapping stays until it goes
        for fd in (self.fd, self.file_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.file_fd = None


class RamBacked:
    """The GuestMemory methods that only ask the mapping, for the machines' memory classes."""

    _ram: RamMapping

    def data_pages(self) -> np.ndarray:
        """Bool per page: may hold non-zero data."""
        return self._ram.data_mask()

    def template_deltas(self) -> np.ndarray | None:
        """Bool per page: no longer the template's (None: not a clone)."""
        return self._ram.template_deltas()

    def hand_over(self) -> list[int]:
        """The memfd for another process; from now on closing never frees its pages."""
        return self._ram.hand_over()


def host_available_bytes() -> int:
    """What this host can still give: MemAvailable plus free swap."""
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
    return fields.get("MemAvailable", 0) + fields.get("SwapFree", 0)


def pagemap(addr: int, pages: int) -> np.ndarray:
    """This process's pagemap entries (u64 each) for `pages` pages from `addr`."""
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        data = os.pread(f.fileno(), pages * 8, (addr // PAGE_SIZE) * 8)
    if len(data) != pages * 8:
        raise OSError(f"short read of /proc/self/pagemap ({len(data)} of {pages * 8} bytes)")
    return np.frombuffer(data, dtype=np.uint64)


def open_ram(size: int, backing: MemoryBacking, name: str) -> RamMapping:
    """Map `size` bytes of RAM as `backing` says; ConfigError when the backing does not fit."""
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if backing.kind is BackingKind.FRESH:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return RamMapping(size, mmap.mmap(fd, size, mmap.MAP_SHARED, prot), fd, None, True)
    if backing.kind is BackingKind.PREPARED:
        return _prepared(size, backing)
    if backing.kind is BackingKind.ADOPTED:
        if len(backing.fds) != 1:
            raise ConfigError(f"RAM is one memfd, {len(backing.fds)} were handed over")
        fd = backing.fds[0]
        try:
            _check_size(fd, size, "the memfd handed over")
        except BaseException:
            os.close(fd)  # adopted: it is ours to close, whatever happens
            raise
        return RamMapping(size, mmap.mmap(fd, size, mmap.MAP_SHARED, prot), fd, None, False)
    try:
        fd = os.open(backing.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"template memory {backing.path}: {e.strerror or e}") from e
    try:
        _check_size(fd, size, f"template memory {backing.path}")
        m = mmap.mmap(fd, size, mmap.MAP_PRIVATE, prot)
    except BaseException:
        os.close(fd)
        raise
    return RamMapping(size, m, None, fd, True, backing.path)


def _prepared(size: int, backing: MemoryBacking) -> RamMapping:
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if len(backing.fds) != 1:
        raise ConfigError(f"prepared RAM is one file, {len(backing.fds)} were given")
    fd = backing.fds[0]
    try:
        have = os.fstat(fd).st_size
        if have < size:
            raise ConfigError(f"prepared RAM holds {have} bytes, the machine's RAM is {size}")
        os.ftruncate(fd, size)  # frees what lies beyond
        return RamMapping(size, mmap.mmap(fd, size, mmap.MAP_SHARED, prot), fd, None, True)
    except BaseException:
        os.close(fd)  # taken over: ours to close, whatever happens
        raise


def _check_size(fd: int, size: int, what: str) -> None:
    have = os.fstat(fd).st_size
    if have != size:
        raise ConfigError(f"{what} holds {have} bytes, the machine's RAM is {size}")
