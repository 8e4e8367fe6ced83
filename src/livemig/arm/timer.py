"""The generic timer of the ARMv8 board: CNTV and CNTP firing their PPIs through the GIC.

Unicorn 2.1.4 keeps no running timers and drops a guest's MSR to CNTV_CTL/CVAL (CNTP too), so
the board emulates the timer registers itself: every guest MRS/MSR goes through a hook
(`on_sysreg`), which serves the six timer registers (CTL, CVAL, TVAL of both timers) and
CNTPCT_EL0 and lets unicorn run every other one. The values are also written into unicorn's
own copies (host side, which does work), so the vCPU state map carries them as before.

Both timers compare against the guest's count, `Counter.now()`: unicorn's CNTPCT (the host's
CLOCK_MONOTONIC at 62.5 MHz) minus the CNTVOFF the board keeps. The guest reads the same count
from CNTVCT_EL0 (unicorn, through CNTVOFF_EL2) and from CNTPCT_EL0 (this hook): on this board
the guest's physical count is its migrated count too, so a CNTP deadline means the same after a
migration as a CNTV one. A timer's output (ENABLE, not IMASK, count >= CVAL) drives its PPI as
a level; a host thread sleeps until the nearest deadline, and a guest write re-evaluates the
lines at once (so a handler that moves CVAL lowers the line before its EOI).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from livemig.arm.gic import PPI_CNTP, PPI_CNTV, Gic
from livemig.arm.regs import SYSREGS

NS_PER_TICK = 16  # 62.5 MHz
POLL_S = 0.002  # while `housekeeping` asks for it: wake this often
_U64 = (1 << 64) - 1
VIRT, PHYS = 0, 1
PPIS = (PPI_CNTV, PPI_CNTP)
# (op0, op1, CRn, CRm, op2) -> (timer, register)
TIMER_REGS: dict[tuple[int, int, int, int, int], tuple[int, str]] = {
    (3, 3, 14, 3, 0): (VIRT, "tval"), (3, 3, 14, 3, 1): (VIRT, "ctl"),
    (3, 3, 14, 3, 2): (VIRT, "cval"), (3, 3, 14, 2, 0): (PHYS, "tval"),
    (3, 3, 14, 2, 1): (PHYS, "ctl"), (3, 3, 14, 2, 2): (PHYS, "cval"),
}
CNTPCT = (3, 3, 14, 0, 1)
# the vCPU map's names of the timers' registers
MAP_NAMES = {(VIRT, "ctl"): "cntv_ctl_el0", (VIRT, "cval"): "cntv_cval_el0",
             (PHYS, "ctl"): "cntp_ctl_el0", (PHYS, "cval"): "cntp_cval_el0"}


class Counter:
    """The guest's count: unicorn's CNTPCT (host monotonic clock, 62.5 MHz) minus `offset`."""

    def __init__(self, uc_cntpct: int) -> None:
        self.delta = uc_cntpct - time.monotonic_ns() // NS_PER_TICK
        self.offset = 0  # CNTVOFF_EL2 as the board set it

    def host(self) -> int:
        """Unicorn's CNTPCT now."""
        return time.monotonic_ns() // NS_PER_TICK + self.delta

    def now(self) -> int:
        return (self.host() - self.offset) & _U64


class Timers:
    """Each vCPU's CNTV and CNTP (CTL and CVAL), their PPI lines, and the thread that fires them.

    `housekeeping`, if set, is called on every wake of the thread; while it returns True the
    thread wakes at least every POLL_S (the machine uses it to re-check vCPUs whose interrupt
    is masked).
    """

    def __init__(self, ncpus: int, counter: Counter, gic: Gic) -> None:
        self.counter = counter
        self.gic = gic
        self.ctl = [[0, 0] for _ in range(ncpus)]
        self.cval = [[0, 0] for _ in range(ncpus)]
        self.housekeeping: Callable[[], bool] | None = None
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    def _fires(self, cpu: int, t: int, now: int) -> bool:
        ctl = self.ctl[cpu][t]
        return bool(ctl & 1) and now >= self.cval[cpu][t]

    def _drive(self, cpu: int, now: int) -> None:
        for t in (VIRT, PHYS):
            self.gic.set_level(cpu, PPIS[t], self._fires(cpu, t, now) and not self.ctl[cpu][t] & 2)

    # --- guest access (vCPU threads, inside the MRS/MSR hook) ---

    def on_sysreg(self, uc: Any, cpu: int, reg: int, enc: tuple[int, int, int, int, int],
                  value: int | None) -> bool:
        """Serve a guest MRS (`value` None: result into unicorn register `reg`) or MSR.

        Returns True when the access was a timer register (the instruction is then skipped).
        """
        if enc == CNTPCT:
            if value is None:
                uc.reg_write(reg, self.counter.now())
            return True
        what = TIMER_REGS.get(enc)
        if what is None:
            return False
        t, name = what
        with self._cv:
            now = self.counter.now()
            if value is None:
                uc.reg_write(reg, self._read(cpu, t, name, now))
                return True
            if name == "ctl":
                self.ctl[cpu][t] = value & 3
            elif name == "cval":
                self.cval[cpu][t] = value & _U64
            else:  # TVAL: signed 32-bit offset from now
                low = value & 0xFFFF_FFFF
                self.cval[cpu][t] = (now + low - ((low & 0x8000_0000) << 1)) & _U64
            for key, regname in MAP_NAMES.items():
                if key[0] == t:
                    uc.cpr_write(*SYSREGS[regname], getattr(self, key[1])[cpu][t])
            self._drive(cpu, now)
            self._cv.notify_all()
        return True

    def _read(self, cpu: int, t: int, name: str, now: int) -> int:
        if name == "ctl":
            return self.ctl[cpu][t] | (4 if self._fires(cpu, t, now) else 0)
        if name == "cval":
            return self.cval[cpu][t]
        return (self.cval[cpu][t] - now) & 0xFFFF_FFFF

    # --- state: the registers live in the vCPU map (names of MAP_NAMES) ---

    def load(self, cpu: int, values: dict[str, int]) -> None:
        """Adopt a vCPU's timer registers (after load_state or set_registers)."""
        with self._cv:
            for (t, name), regname in MAP_NAMES.items():
                if regname in values:
                    getattr(self, name)[cpu][t] = values[regname] & (3 if name == "ctl" else _U64)
            self._drive(cpu, self.counter.now())
            self._cv.notify_all()

    # --- the thread ---

    def start(self) -> None:
        with self._cv:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._loop, name="arm-timer",
                                                daemon=True)
                self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        with self._cv:
            while not self._closing:
                now = self.counter.now()
                nearest: int | None = None
                for cpu in range(len(self.ctl)):
                    self._drive(cpu, now)
                    for t in (VIRT, PHYS):
                        if self.ctl[cpu][t] & 3 == 1 and not self._fires(cpu, t, now):
                            c = self.cval[cpu][t]
                            nearest = c if nearest is None else min(nearest, c)
                timeout = None if nearest is None else (nearest - now) * NS_PER_TICK / 1e9
                if self.housekeeping is not None and self.housekeeping():
                    timeout = POLL_S if timeout is None else min(timeout, POLL_S)
                self._cv.wait(timeout)
