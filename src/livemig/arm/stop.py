"""Stopping a unicorn vCPU at an instruction boundary, from another thread, without the bug.

`uc_emu_stop` called from another thread (and unicorn's own `timeout`, which is the same thing)
can leave PC on an instruction that has already run: unicorn skips re-synchronising PC from the
interrupted translation block when a stop was requested (unicorn issues #1105, #1355). A stop
requested from inside a block hook is exact: the generated code stores the block's address in PC
before calling the hook, and nothing of the block has run yet.

So every vCPU gets a UC_HOOK_BLOCK hook whose callback is a few bytes of native code (no Python,
no GIL: a Python callback per block would cost more than the guest's own work):

    void stop_if_asked(uc_engine *uc, uint64_t address, uint32_t size, int32_t *flag)
    { if (*flag) uc_emu_stop(uc); }

Another thread asks for a stop by setting the vCPU's flag; the vCPU stops at the start of its
next block (a block is at most a few hundred instructions; a loop re-enters its block every
iteration). Measured: the hook costs nothing visible in the guests' throughput.

The callback is built as machine code in an anonymous mapping (written, then made
read+execute), for x86-64 hosts. Elsewhere, or where the system forbids executable anonymous
memory, `StopHook.available` is False and the machine falls back to slices bounded by an
instruction count (correct, much slower for compute-heavy guests).
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import struct
from collections.abc import Callable
from typing import Any

from unicorn import UC_HOOK_BLOCK
from unicorn.unicorn_py3.unicorn import uclib

_PROT_READ, _PROT_EXEC = 1, 4


def _x86_64_code(uc_emu_stop: int) -> bytes:
    return (
        b"\x8b\x01"  # mov eax, [rcx]      ; *flag (4th argument)
        b"\x85\xc0"  # test eax, eax
        b"\x75\x01"  # jne +1
        b"\xc3"  # ret
        b"\x48\xb8" + struct.pack("<Q", uc_emu_stop)  # movabs rax, uc_emu_stop
        + b"\xff\xe0"  # jmp rax             ; tail call uc_emu_stop(uc): uc is still in rdi
    )


class NativeCode:
    """A few bytes of x86-64 machine code, made executable for the process' life.

    `address` is None (and `why` says why) on other hosts or where the system refuses
    executable anonymous memory; callers then fall back to a Python hook.
    """

    def __init__(self, build: Callable[[], bytes]) -> None:
        self.address: int | None = None
        self.why = ""
        self._map: mmap.mmap | None = None
        self._buf: Any = None
        if platform.machine().lower() not in ("x86_64", "amd64"):
            self.why = f"no native hook for {platform.machine()} hosts"
            return
        try:
            code = build()
            m = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            m.write(code)
            buf = (ctypes.c_char * mmap.PAGESIZE).from_buffer(m)
            addr = ctypes.addressof(buf)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            if libc.mprotect(addr, mmap.PAGESIZE, _PROT_READ | _PROT_EXEC) != 0:
                self.why = f"mprotect(PROT_EXEC) refused: errno {ctypes.get_errno()}"
                return
        except (OSError, AttributeError, ValueError, AssertionError) as e:
            self.why = f"cannot build the native hook: {e}"
            return
        self._map, self._buf, self.address = m, buf, addr  # kept for the process' life


def _stop_code() -> bytes:
    stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
    assert stop
    return _x86_64_code(stop)


class _Trampoline(NativeCode):
    def __init__(self) -> None:
        super().__init__(_stop_code)


_trampoline: _Trampoline | None = None


def _get_trampoline() -> _Trampoline:
    global _trampoline
    if _trampoline is None:
        _trampoline = _Trampoline()
    return _trampoline


class StopHook:
    """A per-vCPU flag that, once set, stops that vCPU's `emu_start` at its next block."""

    def __init__(self, uc: Any) -> None:
        t = _get_trampoline()
        self.flag = ctypes.c_int32(0)
        self.available = False
        self.why = t.why
        if t.address is None:
            return
        handle = ctypes.c_size_t(0)
        try:
            status = uclib.uc_hook_add(
                uc._uch, ctypes.byref(handle), UC_HOOK_BLOCK, ctypes.c_void_p(t.address),
                ctypes.c_void_p(ctypes.addressof(self.flag)), 1, 0)  # begin > end: every block
        except (AttributeError, ctypes.ArgumentError) as e:  # another binding's internals
            self.why = f"cannot add the native stop hook: {e}"
            return
        if status != 0:
            self.why = f"uc_hook_add(UC_HOOK_BLOCK) failed with unicorn error {status}"
            return
        self.available = True

    def request(self) -> None:
        """Ask for a stop (any thread); the vCPU stops before running its next block."""
        self.flag.value = 1

    def clear(self) -> None:
        self.flag.value = 0

    @property
    def requested(self) -> bool:
        return bool(self.flag.value)
