"""userfaultfd(2) on a range of this process's memory, through ctypes.

A post-copy destination registers guest RAM in MISSING mode: a page that is not in the RAM
memfd makes whoever touches it (a vCPU inside KVM_RUN, unicorn's emulation thread, the kernel
on their behalf) wait until the fault handler installs it with UFFDIO_COPY (or
UFFDIO_ZEROPAGE). Where the kernel has it (shmem, 5.14+), MINOR mode as well: a page that is
in the memfd but not mapped here (dropped with MADV_DONTNEED) faults too, and is mapped again
with UFFDIO_CONTINUE once its new contents were written through another mapping.

Installing is atomic and only ever fills a hole (or maps an unmapped page): a page the guest
has written since cannot be overwritten by a late copy (EEXIST), which is what makes pushed
and pulled copies of one page safe to race.

Every call here releases the GIL (ctypes), so a thread blocked on a fault never holds it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import select
import struct
from dataclasses import dataclass

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
UFFD_API = 0xAA
FEATURE_MISSING_SHMEM = 1 << 5
FEATURE_THREAD_ID = 1 << 8
FEATURE_MINOR_SHMEM = 1 << 10
REGISTER_MODE_MISSING = 1
REGISTER_MODE_MINOR = 4
PAGEFAULT_FLAG_MINOR = 1 << 2
EVENT_PAGEFAULT = 0x12


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAA << 8) | nr


_WR, _R = 3, 2
UFFDIO_API = _ioc(_WR, 0x3F, 24)
UFFDIO_REGISTER = _ioc(_WR, 0x00, 32)
UFFDIO_UNREGISTER = _ioc(_R, 0x01, 16)
UFFDIO_WAKE = _ioc(_R, 0x02, 16)
UFFDIO_COPY = _ioc(_WR, 0x03, 40)
UFFDIO_ZEROPAGE = _ioc(_WR, 0x04, 32)
UFFDIO_CONTINUE = _ioc(_WR, 0x07, 32)

_MSG = struct.Struct("<BBHIQQI4x")  # event, reserved x3, flags, address, ptid
MSG_SIZE = 32


class UffdError(OSError):
    """userfaultfd is unavailable here or refused an operation."""


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _Zero(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


class _Continue(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("mapped", ctypes.c_int64)]


@dataclass(frozen=True)
class Fault:
    """One page fault: the faulting address, the thread that waits on it, and whether the
    page is in the memfd but not mapped (MINOR) rather than absent."""

    address: int
    thread: int
    minor: bool = False


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise UffdError(err, f"userfaultfd {what}: {os.strerror(err)}")


class Userfaultfd:
    """A userfaultfd with one registered range [start, start + size), in MISSING mode and,
    when `minor` is asked and the kernel has it, MINOR mode too (`self.minor` says)."""

    def __init__(self, start: int, size: int, minor: bool = False) -> None:
        nr = _NR_USERFAULTFD.get(platform.machine())
        if nr is None:
            raise UffdError(errno.ENOSYS, f"userfaultfd: unsupported host {platform.machine()}")
        fd = _libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
        _check(fd, "(is vm.unprivileged_userfaultfd 0 and this not root?)")
        self.fd = int(fd)
        self.start, self.size = start, size
        self.minor = False
        try:
            features = FEATURE_MISSING_SHMEM | FEATURE_THREAD_ID
            api = _Api(UFFD_API, features | (FEATURE_MINOR_SHMEM if minor else 0), 0)
            if _libc.ioctl(self.fd, UFFDIO_API, ctypes.byref(api)) != 0 and minor:
                os.close(self.fd)  # the API handshake happens once per fd: start over
                self.fd = int(_libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK))
                api = _Api(UFFD_API, features, 0)
                _check(_libc.ioctl(self.fd, UFFDIO_API, ctypes.byref(api)), "API")
            self.minor = bool(api.features & FEATURE_MINOR_SHMEM)
            mode = REGISTER_MODE_MISSING | (REGISTER_MODE_MINOR if self.minor else 0)
            reg = _Register(_Range(start, size), mode, 0)
            _check(_libc.ioctl(self.fd, UFFDIO_REGISTER, ctypes.byref(reg)), "REGISTER")
        except BaseException:
            os.close(self.fd)
            raise
        self.registered = True

    def wait(self, timeout: float) -> list[Fault]:
        """Faults pending now, waiting up to `timeout` seconds for the first."""
        if not self.registered:
            return []
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return []
        try:
            data = os.read(self.fd, MSG_SIZE * 64)
        except (BlockingIOError, OSError):
            return []
        out = []
        for off in range(0, len(data) - MSG_SIZE + 1, MSG_SIZE):
            event, _r1, _r2, _r3, flags, address, ptid = _MSG.unpack_from(data, off)
            if event == EVENT_PAGEFAULT:
                out.append(Fault(address, ptid, bool(flags & PAGEFAULT_FLAG_MINOR)))
        return out

    def copy(self, dst: int, src: int, length: int) -> int:
        """Install `length` bytes from `src` at `dst` where nothing is yet; returns the bytes
        installed before a page already present stopped it (all of them when none was)."""
        return self._install(UFFDIO_COPY, _Copy(dst, src, length, 0, 0), "copy", length)

    def zero(self, dst: int, length: int) -> int:
        """Install zero pages at `dst`; like `copy`, returns the bytes installed."""
        return self._install(UFFDIO_ZEROPAGE, _Zero(_Range(dst, length), 0, 0), "zeropage",
                             length)

    def cont(self, dst: int, length: int) -> int:
        """MINOR mode: map pages at `dst` whose contents are in the memfd; like `copy`,
        returns the bytes mapped (0 when the first was mapped already)."""
        return self._install(UFFDIO_CONTINUE, _Continue(_Range(dst, length), 0, 0), "mapped",
                             length)

    def _install(self, code: int, arg: ctypes.Structure, done_field: str, length: int) -> int:
        if _libc.ioctl(self.fd, code, ctypes.byref(arg)) == 0:
            return length
        err = ctypes.get_errno()
        done = int(getattr(arg, done_field))
        if done > 0:  # stopped part way (EAGAIN) at a page already present
            return done
        if err == errno.EEXIST:
            return 0
        raise UffdError(err, f"userfaultfd {done_field}: {os.strerror(err)}")

    def wake(self, dst: int, length: int) -> None:
        """Let threads waiting on a range whose pages are present go on."""
        _check(_libc.ioctl(self.fd, UFFDIO_WAKE, ctypes.byref(_Range(dst, length))), "WAKE")

    def close(self) -> None:
        """Unregister (every waiter then retries and finds its page or a hole it fills
        itself), and close."""
        if self.registered:
            self.registered = False
            _libc.ioctl(self.fd, UFFDIO_UNREGISTER, ctypes.byref(_Range(self.start, self.size)))
            os.close(self.fd)
