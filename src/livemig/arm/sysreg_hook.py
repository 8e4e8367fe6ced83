"""The board's MRS/MSR hook, filtered in native code so that most system registers cost nothing.

Unicorn calls a UC_HOOK_INSN hook for every MRS and MSR the guest executes, whatever the
register; a Python call each time (the guests read CNTVCT_EL0 in their inner loops) slowed
`verify` enough to starve its checks. So the callback unicorn calls is a few bytes of x86-64
(built like the stop hook, `livemig.arm.stop.NativeCode`) that pass on to Python only

- CRn 14, CRm 2 or 3: the CNTP and CNTV registers (CTL, CVAL, TVAL);
- CRn 14, CRm 0, op2 1: CNTPCT_EL0;
- CRn 4, CRm 2, op2 1: DAIF (the board watches writes that unmask IRQs),

and answer "not handled" for the rest. Where native code cannot be built the Python hook gets
every access (correct, slower).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

from unicorn import UC_HOOK_INSN
from unicorn import arm64_const as A
from unicorn.unicorn_py3.arch.arm64 import UcRegCP64
from unicorn.unicorn_py3.unicorn import uclib

from livemig.arm.stop import NativeCode

SYS_CFUNC = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p,
                             ctypes.c_void_p)
# handler(vcpu, read, reg, cp) -> True when it served the access (unicorn skips the instruction)
Handler = Callable[[int, bool, int, Any], bool]


def _filter_code(target: int) -> bytes:
    """x86-64: (uc=rdi, reg=esi, cp=rdx, user_data=rcx); cp->crn at 0, crm at 4, op2 at 16."""
    return (
        b"\x8b\x02"  # 0: mov eax, [rdx]        ; crn
        b"\x83\xf8\x0e"  # 2: cmp eax, 14
        b"\x74\x17"  # 5: je timer (30)
        b"\x83\xf8\x04"  # 7: cmp eax, 4
        b"\x75\x37"  # 10: jne pass (67)
        b"\x8b\x42\x04"  # 12: mov eax, [rdx+4]  ; crm
        b"\x83\xf8\x02"  # 15: cmp eax, 2
        b"\x75\x2f"  # 18: jne pass
        b"\x8b\x42\x10"  # 20: mov eax, [rdx+16] ; op2
        b"\x83\xf8\x01"  # 23: cmp eax, 1        ; DAIF
        b"\x75\x27"  # 26: jne pass
        b"\xeb\x19"  # 28: jmp python (55)
        b"\x8b\x42\x04"  # 30 timer: mov eax, [rdx+4]
        b"\x83\xf8\x02"  # 33: cmp eax, 2
        b"\x74\x11"  # 36: je python
        b"\x83\xf8\x03"  # 38: cmp eax, 3
        b"\x74\x0c"  # 41: je python
        b"\x85\xc0"  # 43: test eax, eax
        b"\x75\x14"  # 45: jne pass
        b"\x8b\x42\x10"  # 47: mov eax, [rdx+16] ; op2
        b"\x83\xf8\x01"  # 50: cmp eax, 1        ; CNTPCT
        b"\x75\x0c"  # 53: jne pass
        b"\x48\xb8" + struct.pack("<Q", target)  # 55 python: movabs rax, target
        + b"\xff\xe0"  # 65: jmp rax (tail call, arguments untouched)
        b"\x31\xc0"  # 67 pass: xor eax, eax    ; not handled: unicorn runs the instruction
        b"\xc3"  # 69: ret
    )


class SysregHook:
    """Routes a machine's guest MRS/MSR (of the registers above) to `handler`."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._cb = SYS_CFUNC(self._entry)  # kept: unicorn holds its address
        target = ctypes.cast(self._cb, ctypes.c_void_p).value
        assert target
        self.native = NativeCode(lambda: _filter_code(target))

    def _entry(self, handle: Any, reg: int, pcp: Any, data: Any) -> int:
        key = data or 0
        cp = ctypes.cast(pcp, ctypes.POINTER(UcRegCP64)).contents
        return 1 if self._handler(key >> 1, bool(key & 1), reg, cp) else 0

    def attach(self, uc: Any, vcpu: int) -> None:
        """Hook MRS and MSR of one vCPU's unicorn."""
        for insn, read in ((A.UC_ARM64_INS_MRS, True), (A.UC_ARM64_INS_MSR, False)):
            key = vcpu << 1 | int(read)
            if self.native.address is None:
                uc.hook_add(UC_HOOK_INSN, self._python_hook, key, 1, 0, insn)
                continue
            handle = ctypes.c_size_t(0)
            status = uclib.uc_hook_add(
                uc._uch, ctypes.byref(handle), UC_HOOK_INSN, ctypes.c_void_p(self.native.address),
                ctypes.c_void_p(key), ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(insn))
            if status != 0:
                raise RuntimeError(f"uc_hook_add(UC_HOOK_INSN) failed with unicorn error {status}")

    def _python_hook(self, uc: Any, reg: int, cp: Any, key: int) -> bool:
        return self._handler(key >> 1, bool(key & 1), reg, cp)
