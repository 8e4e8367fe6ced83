"""One thread per vCPU calling KVM_RUN, parked and released on request.

A parked vCPU is outside KVM_RUN and waiting on a condition, so its state may be read and
written from another thread. To park a vCPU that is inside KVM_RUN we set `immediate_exit`
and send it KICK_SIGNAL: KVM_RUN returns EINTR, whether the signal arrives before or during
the call.
"""

from __future__ import annotations

import errno
import signal
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from livemig.contract import MachineError
from livemig.kvm import ExitReason, Vcpu

KICK_SIGNAL = signal.SIGUSR1
THROTTLE_SLICE = 0.010  # seconds of guest time between throttle pauses


def _ignore_kick(_signum: int, _frame: object) -> None:
    """The signal only needs to interrupt KVM_RUN; nothing else is done."""


def install_kick_handler() -> None:
    """Install the no-op handler for KICK_SIGNAL; must happen once on the main thread."""
    if signal.getsignal(KICK_SIGNAL) is _ignore_kick:
        return
    if threading.current_thread() is not threading.main_thread():
        raise MachineError("the first KVM machine of a process must be created on its main thread")
    signal.signal(KICK_SIGNAL, _ignore_kick)


@dataclass
class PortBus:
    """Where port I/O goes: `out(port, size, value)` and `inp(port, size) -> value`."""

    out: Callable[[int, int, int], None]
    inp: Callable[[int, int], int]
    mmio: Callable[[int, bytes | None, int], bytes]


class VcpuThread:
    """Runs one vCPU; `pause()`/`release()` park it, `stop()` ends it."""

    def __init__(self, vcpu: Vcpu, bus: PortBus, on_fatal: Callable[[str], None],
                 drain: Callable[[], None] = lambda: None) -> None:
        self.vcpu = vcpu
        self.bus = bus
        self.on_fatal = on_fatal
        self.drain = drain  # writes KVM kept without an exit (coalesced.py), due first
        self.throttle = 0.0
        self._cond = threading.Condition()
        self._want_pause = True
        self._parked = False
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"vcpu{vcpu.index}", daemon=True)
        self.exits = 0
        # An I/O or MMIO exit is finished (RIP advanced, IN data stored) only when KVM_RUN is
        # entered again; until then the vCPU's registers are not a state that may be saved.
        self._io_pending = False

    def start(self, paused: bool) -> None:
        self._want_pause = paused
        self._thread.start()

    def kick(self) -> None:
        self.vcpu.run.immediate_exit = 1
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive():
            signal.pthread_kill(ident, KICK_SIGNAL)

    def pause(self) -> None:
        with self._cond:
            self._want_pause = True
            self._cond.notify_all()  # a throttled vCPU waiting out its share
            self.kick()

    def wait_parked(self, timeout: float = 5.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._parked or not self._thread.is_alive(), timeout)
        if not ok:
            raise MachineError(f"vCPU {self.vcpu.index} did not leave guest mode in {timeout}s")

    def release(self) -> None:
        with self._cond:
            self._want_pause = False
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            self.kick()
        if self._thread.ident is not None:
            self._thread.join(timeout=5)

    def _park_if_asked(self) -> bool:
        """Wait while a pause is requested; False once the thread must end."""
        with self._cond:
            if self._want_pause and not self._stopping:
                self._complete_pending_io()
                self._parked = True
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self._want_pause or self._stopping)
                self._parked = False
            self.vcpu.run.immediate_exit = 0
            return not self._stopping

    def _throttle_wait(self, seconds: float) -> None:
        """Stay out of the guest for the throttle's share (up to 0.99 s at 99 %), but no
        longer than until a pause or a stop is asked: a switch-over must not wait for it."""
        with self._cond:
            self._cond.wait_for(lambda: self._want_pause or self._stopping, seconds)

    def _complete_pending_io(self) -> None:
        if self._io_pending:
            self.vcpu.run.immediate_exit = 1
            self.vcpu.run_once()  # completes the exit, then returns EINTR without running
            self._io_pending = False

    def _loop(self) -> None:
        while self._park_if_asked():
            err = self.vcpu.run_once()
            self._io_pending = False  # entering KVM_RUN completed any earlier exit
            self.drain()
            if err == errno.EAGAIN:  # an AP woke from wait-for-SIPI: enter again
                continue
            if err == errno.EINTR:
                if self.throttle > 0:
                    self._throttle_wait(THROTTLE_SLICE * self.throttle / (1.0 - self.throttle))
                continue
            if err:
                self.on_fatal(f"vCPU {self.vcpu.index}: KVM_RUN failed: errno {err}")
                return
            self.exits += 1
            self._io_pending = self.vcpu.run.exit_reason in (ExitReason.IO, ExitReason.MMIO)
            problem = self._handle_exit()
            if problem:
                self.on_fatal(f"vCPU {self.vcpu.index}: {problem}")
                return

    def _handle_exit(self) -> str | None:
        run = self.vcpu.run
        reason = run.exit_reason
        if reason == ExitReason.IO:
            self._handle_io()
        elif reason == ExitReason.MMIO:
            m = run.exit.mmio
            if m.is_write:
                self.bus.mmio(m.phys_addr, bytes(m.data[:m.len]), m.len)
            else:
                data = self.bus.mmio(m.phys_addr, None, m.len)
                for i in range(m.len):
                    m.data[i] = data[i]
        elif reason in (ExitReason.INTR, ExitReason.IRQ_WINDOW_OPEN):
            pass
        elif reason == ExitReason.SHUTDOWN:
            return "guest shut down (triple fault)"
        elif reason == ExitReason.HLT:
            return "guest halted with interrupts it cannot receive"
        elif reason == ExitReason.FAIL_ENTRY:
            code = run.exit.fail_entry.hardware_entry_failure_reason
            return f"VM entry failed, hardware reason {code:#x}"
        elif reason == ExitReason.INTERNAL_ERROR:
            rip = self.vcpu.get_regs().rip
            return f"KVM internal error, suberror {run.exit.internal.suberror} at rip {rip:#x}"
        elif reason == ExitReason.SYSTEM_EVENT:
            return f"guest system event {run.exit.system_event.type} (reset or power off)"
        else:
            return f"unhandled exit reason {reason}"
        return None

    def _handle_io(self) -> None:
        io = self.vcpu.run.exit.io
        size, fmt = io.size, {1: "<B", 2: "<H", 4: "<I"}[io.size]
        data = self.vcpu.io_data(io.data_offset, size * io.count)
        for i in range(io.count):
            chunk = data[i * size:(i + 1) * size]
            if io.direction == 1:
                self.bus.out(io.port, size, struct.unpack(fmt, bytes(chunk))[0])
            else:
                value = self.bus.inp(io.port, size)
                for j, b in enumerate(struct.pack(fmt, value & ((1 << (8 * size)) - 1))):
                    data[i * size + j] = b
