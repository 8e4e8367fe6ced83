"""Armv8Machine: the emulated ARMv8 board (unicorn), implementing livemig's Machine contract.

Board: RAM at guest-physical RAM_BASE (0x4000_0000, as on QEMU virt), a GICv2 (distributor
0x0800_0000, CPU interface 0x0801_0000), a PL011 UART at 0x0900_0000 (SPI 33), the probe at
PROBE_MMIO_BASE (0x0A00_0000), the generic timer (CNTV PPI 27, CNTP PPI 30). The board takes
exceptions and interrupts to the guest's VBAR_EL1 itself (`livemig.arm.exceptions`).
One unicorn instance per vCPU, each run by its own thread in slices (`emu_start`; ctypes
releases the GIL while the guest runs), all mapping the same memfd RAM. A slice ends only when
the vCPU's own block hook sees a stop request (`livemig.arm.stop`): never `emu_stop` from
another thread nor unicorn's `timeout`, which can make an instruction run twice
(docs/arm-state.md). Boot ABI and state layout: docs/guest-abi.md and docs/arm-state.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import unicorn
from unicorn import (
    UC_ARCH_ARM64,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_WRITE_UNMAPPED,
    UC_MODE_ARM,
    UC_PROT_ALL,
    UcError,
)
from unicorn import arm64_const as A
from unicorn.unicorn_py3.arch.arm64 import UcAArch64 as Uc

from livemig.arm import exceptions, regs
from livemig.arm.devices import UART_BASE, UART_SIZE, Console, Pl011, ProbeDevice
from livemig.arm.exceptions import Sync, Vector
from livemig.arm.gic import GIC_SIZE, GICC_BASE, GICD_BASE, SPI_UART, Gic
from livemig.arm.loader import RAM_BASE, load_image, place_cmdline
from livemig.arm.memory import ArmMemory
from livemig.arm.stop import StopHook
from livemig.arm.sysreg_hook import SysregHook
from livemig.arm.timer import Counter, Timers
from livemig.contract import (
    Arch,
    ConfigError,
    MachineConfig,
    MachineError,
    MachineState,
    StateError,
)
from livemig.probe import PROBE_MMIO_BASE, ProbeLog

CPU_MODEL = "unicorn-cortex-a72"
MAX_VCPUS = 4
MIN_MEM = 16 << 20
MAX_MEM = 4 << 30  # the guests' identity map covers RAM_BASE .. RAM_BASE + 4 GiB
SLICE_S = 0.020  # while throttled: guest time between two of a vCPU's sleeps
_IDLE_S = 0.002  # a slice that ends by itself (WFI): sleep before re-entering
_COUNT_SLICE = 200_000  # fallback without the native stop hook: instructions per slice
_NEVER = 0xFFFF_FFFF_FFFF_FFFC  # `until` address no guest reaches
_U64 = (1 << 64) - 1
_DAIF = (3, 3, 4, 2, 1)
_VECTORS_SIZE = 0x800


class _Vcpu:
    def __init__(self, index: int, uc: Uc) -> None:
        self.index = index
        self.uc = uc
        self.stop = StopHook(uc)
        self.thread: threading.Thread | None = None
        self.parked = True
        self.fault: str | None = None
        # set by hooks inside emu_start, taken by the vCPU's thread once it has returned
        self.intr: tuple[int, Sync | None] | None = None
        self.abort: tuple[int, bool, bool] | None = None  # address, write, fetch
        self.irq_masked = False  # its IRQ line is up but PSTATE.I masks it


class Armv8Machine:
    """An ARMv8 board of 1-4 emulated Cortex-A72 cores (unicorn), memfd RAM, GICv2, generic
    timer, PL011, probe.

    Failure reporting (the contract's `error`, and the `stopped` event the CLI host polls):
    a vCPU that faults (an exception the board does not deliver, docs/arm-state.md) is parked
    for good and the others go on. `error` is the first such fault from then on (the guest is
    no longer whole, so callers should know), but `stopped` is set only when the machine as a
    whole can no longer run: every vCPU has faulted, or the machine was closed. A host serving
    the machine therefore ends when the guest is dead, not when one of its CPUs is.
    """

    def __init__(self, config: MachineConfig, console: Console = None) -> None:
        _check_config(config)
        self.config = config
        self.memory = ArmMemory(config.mem_size, backing=config.backing)
        self.probe = ProbeLog()
        self.gic = Gic(config.vcpus, self._kick)
        self.uart = Pl011(config.vcpus, console,
                          irq=lambda high: self.gic.set_level(0, SPI_UART, high))
        self._ram = self.memory.view()
        self._probe_dev = ProbeDevice(self.probe, self._ram, RAM_BASE, config.vcpus)
        self._cond = threading.Condition()
        self._run_wanted = False
        self._closing = False
        self._started = False
        self._state_loaded = False
        self._throttle = 0.0
        self._ticker: threading.Thread | None = None
        self.error: str | None = None  # first vCPU fault, else None
        self.stopped = threading.Event()  # set when every vCPU faulted or the machine closed
        self._sysregs = SysregHook(self._on_sysreg)
        self._vcpus: list[_Vcpu] = [self._make_vcpu(i) for i in range(config.vcpus)]
        self.counter = Counter(self._vcpus[0].uc.cpr_read(*regs.CNTPCT_EL0))
        self.timers = Timers(config.vcpus, self.counter, self.gic)
        self.timers.housekeeping = self._rekick_masked
        # False only on hosts where the native stop hook cannot be built (docs/arm-state.md)
        self.exact_stop = all(v.stop.available for v in self._vcpus)

    @property
    def cpu_model(self) -> str:
        """The CPU a saved state is bound to: unicorn's Cortex-A72 model."""
        return CPU_MODEL

    @property
    def running(self) -> bool:
        return self._started and self._run_wanted and not self._closing

    @property
    def faults(self) -> list[str]:
        """Why vCPUs stopped for good (unhandled exception, bad access), one line each."""
        return [v.fault for v in self._vcpus if v.fault]

    def _make_vcpu(self, i: int) -> _Vcpu:
        uc = cast(Uc, unicorn.Uc(UC_ARCH_ARM64, UC_MODE_ARM))
        uc.ctl_set_cpu_model(A.UC_CPU_ARM64_A72)
        uc.mem_map_ptr(RAM_BASE, self.memory.size, UC_PROT_ALL, self.memory.address)
        uc.mmio_map(UART_BASE, UART_SIZE, self._uart_read, i, self._uart_write, i)
        uc.mmio_map(PROBE_MMIO_BASE, 0x1000, self._probe_read, i, self._probe_write, i)
        uc.mmio_map(GICD_BASE, GIC_SIZE, self._gicd_read, i, self._gicd_write, i)
        uc.mmio_map(GICC_BASE, GIC_SIZE, self._gicc_read, i, self._gicc_write, i)
        uc.hook_add(UC_HOOK_INTR, self._on_intr, i)
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped, i)
        self._sysregs.attach(uc, i)
        return _Vcpu(i, uc)

    # --- devices (called from vCPU threads, inside emu_start) ---

    def _uart_read(self, uc: Any, offset: int, size: int, vcpu: int) -> int:
        return self.uart.read(offset)

    def _uart_write(self, uc: Any, offset: int, size: int, value: int, vcpu: int) -> None:
        self.uart.write(vcpu, offset, value)

    def _probe_read(self, uc: Any, offset: int, size: int, vcpu: int) -> int:
        return 0

    def _probe_write(self, uc: Any, offset: int, size: int, value: int, vcpu: int) -> None:
        self._probe_dev.write(vcpu, offset, size, value)

    def _gicd_read(self, uc: Any, offset: int, size: int, vcpu: int) -> int:
        return self.gic.dist_read(vcpu, offset, size)

    def _gicd_write(self, uc: Any, offset: int, size: int, value: int, vcpu: int) -> None:
        self.gic.dist_write(vcpu, offset, size, value)

    def _gicc_read(self, uc: Any, offset: int, size: int, vcpu: int) -> int:
        return self.gic.cpu_read(vcpu, offset)

    def _gicc_write(self, uc: Any, offset: int, size: int, value: int, vcpu: int) -> None:
        self.gic.cpu_write(vcpu, offset, value)

    # --- exceptions and interrupts ---

    def _on_intr(self, uc: Any, intno: int, vcpu: int) -> None:
        """A synchronous exception unicorn does not take: noted, taken once emu_start returns."""
        self._vcpus[vcpu].intr = (intno, exceptions.from_intr(uc, intno))
        uc.emu_stop()  # from the vCPU's own thread, between instructions: exact

    def _on_unmapped(self, uc: Any, access: int, address: int, size: int, value: int,
                     vcpu: int) -> bool:
        self._vcpus[vcpu].abort = (address, access == UC_MEM_WRITE_UNMAPPED,
                                   access == UC_MEM_FETCH_UNMAPPED)
        return False

    def _on_sysreg(self, vcpu: int, read: bool, reg: int, cp: Any) -> bool:
        """Guest MRS/MSR (those `SysregHook` passes on): the timer's registers are the board's;
        a DAIF write that unmasks IRQs while this vCPU's line is up stops it at its next block
        to take it."""
        uc = self._vcpus[vcpu].uc
        if cp.crn == 14:
            enc = (cp.op0, cp.op1, cp.crn, cp.crm, cp.op2)
            return self.timers.on_sysreg(uc, vcpu, reg, enc, None if read else cp.val)
        if (not read and not cp.val & 0x80 and (cp.op0, cp.op1, cp.crn, cp.crm, cp.op2) == _DAIF
                and self.gic.irq_line(vcpu)):
            self._vcpus[vcpu].stop.request()
            if not self.exact_stop:  # no block hook: stop after this MSR (it ends its block)
                uc.emu_stop()
        return False

    def _kick(self, cpu: int) -> None:
        """The GIC raised `cpu`'s IRQ line: stop it at its next block, wake it from WFI."""
        if cpu < len(self._vcpus):
            self._vcpus[cpu].stop.request()
        with self._cond:
            self._cond.notify_all()

    def _rekick_masked(self) -> bool:
        """Stop the vCPUs whose interrupt waits for PSTATE.I (an ERET or DAIFClr unmasks it
        without a hook); True while there is one."""
        if not self._run_wanted:
            return False  # parked vCPUs take it when they resume
        waiting = [v for v in self._vcpus if v.irq_masked]
        for v in waiting:
            v.stop.request()
        return bool(waiting)

    def _take_irq(self, v: _Vcpu) -> None:
        if not self.gic.irq_line(v.index):
            v.irq_masked = False
            return
        v.irq_masked = exceptions.irq_masked(v.uc)
        if not v.irq_masked:
            exceptions.enter(v.uc, Vector.IRQ, v.uc.reg_read(A.UC_ARM64_REG_PC))

    def _take_sync(self, v: _Vcpu, s: Sync, what: str) -> None:
        """Enter the guest's sync vector, unless it has none or the vector itself failed."""
        vbar = v.uc.cpr_read(*regs.SYSREGS["vbar_el1"])
        if vbar == 0 or vbar <= s.elr < vbar + _VECTORS_SIZE:
            self._fault(v, what)
            return
        exceptions.enter(v.uc, Vector.SYNC, s.elr, s.esr, s.far)

    # --- life cycle ---

    def start(self) -> None:
        """Boot the image (fresh machine) or run from the loaded state."""
        if self._started:
            raise MachineError("machine is already started")
        if not self._state_loaded:
            self._boot()
        self._started = True
        self._run_wanted = True
        self.timers.start()
        for v in self._vcpus:
            v.thread = threading.Thread(
                target=self._run, args=(v,), name=f"arm-vcpu{v.index}", daemon=True
            )
            v.parked = False
            v.thread.start()

    def _boot(self) -> None:
        if not self.config.image:
            raise ConfigError("no guest image given")
        loaded = load_image(self.config.image, self._ram)
        cmdline = place_cmdline(self.config.cmdline, self._ram)
        for v in self._vcpus:
            v.uc.reg_write(A.UC_ARM64_REG_PC, loaded.entry)
            v.uc.reg_write(A.UC_ARM64_REG_X0, cmdline)
            v.uc.reg_write(A.UC_ARM64_REG_X1, self.memory.size)
            v.uc.reg_write(A.UC_ARM64_REG_X2, v.index)
            v.uc.reg_write(A.UC_ARM64_REG_X3, len(self._vcpus))

    def _run(self, v: _Vcpu) -> None:
        while True:
            with self._cond:
                while not self._closing and (not self._run_wanted or v.fault):
                    if not v.parked:  # only on parking: parked threads must not wake each other
                        v.parked = True
                        self._cond.notify_all()
                    self._cond.wait()
                if self._closing:
                    v.parked = True
                    self._cond.notify_all()
                    return
                v.parked = False
                # Cleared while run is wanted, under the lock: a pause that follows sets it again.
                v.stop.clear()
            self._slice(v)

    def _slice(self, v: _Vcpu) -> None:
        self._take_irq(v)
        t0 = time.monotonic()
        pc = v.uc.reg_read(A.UC_ARM64_REG_PC)
        try:
            if self.exact_stop:  # runs until the block hook sees v.stop
                v.uc.emu_start(pc, _NEVER)
            else:
                v.uc.emu_start(pc, _NEVER, count=_COUNT_SLICE)
        except UcError as e:
            if v.abort is not None:
                address, write, fetch = v.abort
                v.abort = None
                self._take_sync(v, exceptions.external_abort(v.uc, address, write, fetch),
                                f"{e} at address {address:#x}")
            else:
                self._fault(v, f"{e}")
            return
        if v.intr is not None:
            (intno, sync), v.intr = v.intr, None
            what = (f"{exceptions.EXCP_NAMES.get(intno, 'exception')} not delivered "
                    f"(QEMU exception {intno})")
            if sync is None:
                self._fault(v, what)
            else:
                self._take_sync(v, sync, what)
            return
        ran = time.monotonic() - t0
        pause = ran * self._throttle / (1.0 - self._throttle) if self._throttle else 0.0
        by_itself = not v.stop.requested if self.exact_stop else ran < _IDLE_S / 2
        if by_itself and self._run_wanted:
            self._wait_for_interrupt(v)
        if pause:
            with self._cond:
                self._cond.wait_for(lambda: not self._run_wanted or self._closing, pause)

    def _wait_for_interrupt(self, v: _Vcpu) -> None:
        """WFI: sleep until this vCPU's IRQ line rises (masked or not) or the machine pauses.

        A guest that has not turned the GIC on is woken every _IDLE_S, as before the GIC.
        """
        limit = None if self.gic.enabled_for(v.index) else _IDLE_S
        with self._cond:
            self._cond.wait_for(lambda: not self._run_wanted or self._closing
                                or self.gic.irq_line(v.index), limit)

    def _fault(self, v: _Vcpu, why: str) -> None:
        pc = v.uc.reg_read(A.UC_ARM64_REG_PC)
        v.fault = f"vCPU {v.index} stopped: {why} at pc {pc:#x}"
        self.uart.write(v.index, 0, 0x0A)  # end any partial line
        for ch in f"[livemig] {v.fault}\n".encode():
            self.uart.write(v.index, 0, ch)
        with self._cond:
            self._note_faults()

    def _note_faults(self) -> None:
        """Derive `error` and `stopped` from the vCPUs' faults (call with `_cond` held)."""
        first = next((v.fault for v in self._vcpus if v.fault), None)
        if self.error is None:
            self.error = first
        if self._vcpus and all(v.fault for v in self._vcpus):
            self.stopped.set()

    def pause(self) -> None:
        """Return once every vCPU thread is parked outside emu_start.

        Each running vCPU's stop flag is set; its block hook stops it at the start of its next
        block (exact PC, nothing run twice), and its thread parks.
        """
        with self._cond:
            self._run_wanted = False
            for v in self._vcpus:
                v.stop.request()
            self._cond.notify_all()  # wakes threads sleeping for the throttle or after WFI
            self._cond.wait_for(lambda: all(v.parked for v in self._vcpus))

    def resume(self) -> None:
        if not self._started:
            raise MachineError("machine is not started")
        if self.stopped.is_set():
            raise MachineError(f"cannot resume: {self.error or 'machine is closed'}")
        with self._cond:
            self._run_wanted = True
            self._cond.notify_all()

    def set_throttle(self, fraction: float) -> None:
        """Keep vCPUs out of the emulator `fraction` (0..0.99) of the time."""
        with self._cond:
            self._throttle = min(max(float(fraction), 0.0), 0.99)
            if self._throttle and self._ticker is None and not self._closing:
                self._ticker = threading.Thread(target=self._tick, name="arm-throttle",
                                                daemon=True)
                self._ticker.start()
            self._cond.notify_all()

    def _tick(self) -> None:
        """While throttled, end every vCPU's slice each SLICE_S so that its thread can sleep."""
        while True:
            with self._cond:
                if self._closing or not self._throttle:
                    self._ticker = None
                    return
            time.sleep(SLICE_S)
            for v in self._vcpus:
                v.stop.request()

    def close(self) -> None:
        """Stop the vCPU threads and free RAM; the machine cannot be used afterwards."""
        if self._closing:
            return
        self.pause()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            ticker = self._ticker
        self.stopped.set()
        self.timers.close()
        for v in self._vcpus:
            if v.thread is not None:
                v.thread.join()
        if ticker is not None:
            ticker.join()
        self._vcpus = []
        self._ram.release()
        self.memory.close()

    # --- state ---

    def save_state(self) -> MachineState:
        """Capture every vCPU's registers, the virtual counter and the devices (paused)."""
        if self.running:
            raise MachineError("pause the machine before saving its state")
        uc0 = self._vcpus[0].uc
        vm: dict[str, Any] = {
            "ram_base": RAM_BASE,
            "mem_size": self.memory.size,
            "cntvct": uc0.cpr_read(*regs.CNTVCT_EL0),
            "cntfrq": uc0.cpr_read(*regs.CNTFRQ_EL0),
            "faults": [v.fault or "" for v in self._vcpus],
        }
        return MachineState(
            arch=Arch.ARM64,
            cpu_model=self.cpu_model,
            vcpus=[regs.capture(v.uc) for v in self._vcpus],
            vm=vm,
            devices={
                "uart": self.uart.state(),
                "probe": self.probe.state(),
                "probe_device": self._probe_dev.state(),
                "gic": self.gic.state(),
            },
        )

    def load_state(self, state: MachineState) -> None:
        """Validate `state` completely, then apply it; StateError leaves the machine as it was."""
        if self.running:
            raise StateError("cannot load state into a running machine; pause it first")
        state.check_compatible(Arch.ARM64, self.cpu_model, len(self._vcpus))
        for i, s in enumerate(state.vcpus):
            regs.validate(s, i)
        self._check_vm(state.vm)
        Pl011.validate(state.devices.get("uart"), len(self._vcpus))
        ProbeDevice.validate(state.devices.get("probe_device"), len(self._vcpus))
        self.gic.validate(state.devices.get("gic"))
        offset = None
        for v, s in zip(self._vcpus, state.vcpus, strict=True):
            regs.apply(v.uc, s)
            if offset is None:  # the counter goes on from the saved count, not the host's
                offset = (v.uc.cpr_read(*regs.CNTPCT_EL0) - state.vm["cntvct"]) & _U64
            v.uc.cpr_write(*regs.CNTVOFF_EL2, offset)
            v.uc.ctl_flush_tb()
        assert offset is not None
        self.counter.offset = offset
        with self._cond:
            for v, fault in zip(self._vcpus, state.vm["faults"], strict=True):
                v.fault = fault or None
            self.error = None
            self.stopped.clear()
            self._note_faults()
        self.uart.load(state.devices["uart"])
        self._probe_dev.load(state.devices["probe_device"])
        self.gic.load(state.devices["gic"])
        for i, s in enumerate(state.vcpus):
            self.timers.load(i, s)  # drives the timer PPIs from the adopted count
        self._state_loaded = True

    def get_registers(self, vcpu: int, names: Sequence[str]) -> dict[str, int]:
        """Read some 64-bit registers of one paused vCPU, by name.

        Names are those of the vCPU state map that hold integers (`x0`..`x30`, `pc`, `pstate`,
        `sp_el0`, system registers: docs/arm-state.md) plus `sp` (the stack pointer PSTATE.SPSel
        selects) and `lr` (X30). Used to migrate a chosen subset of registers (the thesis'
        experiment); a whole vCPU goes through `save_state`.
        """
        return regs.read_named(self._paused_vcpu(vcpu).uc, list(names))

    def set_registers(self, vcpu: int, values: Mapping[str, int]) -> None:
        """Write some 64-bit registers of one paused vCPU (names as in `get_registers`).

        Every name and value is checked before anything is written (StateError). This adopts
        registers into the vCPU as it is; it does not make a booted machine out of a fresh one
        (a fresh machine still boots its image on `start`).
        """
        uc = self._paused_vcpu(vcpu).uc
        regs.write_named(uc, dict(values))
        uc.ctl_flush_tb()
        self.timers.load(vcpu, dict(values))

    def raise_spi(self, intid: int) -> None:
        """Send an edge on SPI `intid` (32..63), as a device wired to it would (running or not).

        The board has no device on SPIs other than the PL011's (33); tests and benchmarks use
        this to have an interrupt pending at a chosen moment.
        """
        self.gic.pulse(intid)

    def _paused_vcpu(self, vcpu: int) -> _Vcpu:
        if self.running:
            raise MachineError("pause the machine before reading or writing registers")
        if not 0 <= vcpu < len(self._vcpus):
            raise MachineError(f"no vCPU {vcpu}: this machine has {len(self._vcpus)}")
        return self._vcpus[vcpu]

    def _check_vm(self, vm: dict[str, Any]) -> None:
        if vm.get("ram_base") != RAM_BASE or vm.get("mem_size") != self.memory.size:
            raise StateError(
                f"state is for RAM {vm.get('mem_size')} bytes at {vm.get('ram_base')}, "
                f"this machine has {self.memory.size} bytes at {RAM_BASE:#x}"
            )
        cnt = vm.get("cntvct")
        if not isinstance(cnt, int) or not 0 <= cnt <= _U64:
            raise StateError("state has no valid virtual counter (vm.cntvct)")
        faults = vm.get("faults")
        if not isinstance(faults, list) or len(faults) != len(self._vcpus):
            raise StateError("state has no per-vCPU fault list (vm.faults)")


def _check_config(config: MachineConfig) -> None:
    if config.arch is not Arch.ARM64:
        raise ConfigError(f"Armv8Machine builds arm64 machines, not {config.arch.value}")
    if not 1 <= config.vcpus <= MAX_VCPUS:
        raise ConfigError(f"the ARMv8 board has 1 to {MAX_VCPUS} vCPUs, not {config.vcpus}")
    if not MIN_MEM <= config.mem_size <= MAX_MEM or config.mem_size % (2 << 20):
        raise ConfigError(
            f"ARMv8 memory must be a multiple of 2 MiB from {MIN_MEM >> 20} MiB to "
            f"{MAX_MEM >> 30} GiB, not {config.mem_size}"
        )
