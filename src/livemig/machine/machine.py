"""KvmMachine: an x86-64 machine on the Linux KVM API implementing the Machine contract."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from livemig.contract import (
    Arch,
    ConfigError,
    MachineConfig,
    MachineError,
    MachineState,
    StateError,
)
from livemig.kvm import Kvm, KvmError
from livemig.machine import cpu, multiboot
from livemig.machine.coalesced import CoalescedPorts
from livemig.machine.memory import GuestRam
from livemig.machine.pci import PciBus
from livemig.machine.tap import Tap, parse_mac
from livemig.machine.uart import Uart16550
from livemig.machine.vcpu import THROTTLE_SLICE, PortBus, VcpuThread, install_kick_handler
from livemig.machine.virtio_net import VirtioNet
from livemig.probe import PROBE_PORT, RECORD, ProbeLog

TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
MAX_VCPUS = 64
IRQCHIPS = {"pic_master": 0, "pic_slave": 1, "ioapic": 2}
NIC_FIRST_SLOT = 3  # net0 is 00:03.0, as under QEMU

ConsoleSink = Callable[[bytes], None]


class KvmMachine:
    """RAM, vCPU threads, in-kernel irqchip/PIT, a UART, the probe device, and a PCI bus
    with a virtio-net NIC for each MAC in `config.nics`, behind the host TAP of the same
    index in `taps` (host-local: not part of the config that migrates)."""

    def __init__(self, config: MachineConfig, console: ConsoleSink | None = None,
                 taps: Sequence[str] = ()) -> None:
        if config.arch is not Arch.X86_64:
            raise ConfigError(f"KvmMachine runs x86_64 guests, not {config.arch.value}")
        if not 1 <= config.vcpus <= MAX_VCPUS:
            raise ConfigError(f"vCPU count {config.vcpus} is outside 1..{MAX_VCPUS}")
        if len(taps) != len(config.nics):
            raise ConfigError(f"the machine has {len(config.nics)} NIC(s) and this host gives "
                              f"{len(taps)} TAP(s) for them (--net tap=NAME)")
        macs = [parse_mac(m) for m in config.nics]
        install_kick_handler()
        self.config = config
        opened: list[Tap] = []
        try:  # TAPs first: a host that cannot give them costs nothing else
            opened += [Tap(t) for t in taps]
            self.memory = GuestRam(config.mem_size, config.backing)
        except BaseException:
            for t in opened:
                t.close()
            raise
        self.probe = ProbeLog()
        self.uart = Uart16550(console)
        self.error: str | None = None
        self.stopped = threading.Event()  # set when the guest died or the machine closed
        self._state_loaded = False
        self._started = False
        self._running = False
        self._throttle = 0.0
        self._throttle_thread: threading.Thread | None = None
        self.unknown_io = 0
        self.device_errors: list[str] = []
        self.pci = PciBus()
        self.nics: list[VirtioNet] = []
        try:
            self._build_vm()
        except BaseException:
            for t in opened:
                t.close()
            raise
        for i, (mac, tap) in enumerate(zip(macs, opened, strict=True)):
            nic = VirtioNet(f"net{i}", mac, tap, self.memory, self._device_error)
            self.nics.append(nic)
            self.pci.add(NIC_FIRST_SLOT + i, nic)

    def _build_vm(self) -> None:
        try:
            self.kvm = Kvm()
            self.vm = self.kvm.create_vm()
            self.vm.set_tss_addr(TSS_ADDR)
            self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
            self.vm.create_irqchip()
            self.vm.create_pit2()
            self.memory.attach(self.vm)
            supported = self.kvm.supported_cpuid()
            self._cpu_model = cpu.cpu_model(supported)
            self.vcpus = []
            for i in range(self.config.vcpus):
                v = self.vm.create_vcpu(i)
                v.set_cpuid(cpu.cpuid_for(supported, i))
                self.vcpus.append(v)
            self.coalesced = CoalescedPorts(self.kvm, self.vm, self.vcpus[0],
                                            [(self.uart.base, 1)], self._port_out)
            self._msrs = cpu.migratable_msrs(self.kvm, self.vcpus[0])
            self._blob_sizes = cpu.blob_sizes(self.kvm)
        except KvmError as e:
            self.memory.close()
            raise MachineError(str(e)) from e
        bus = PortBus(self._port_out, self._port_in, self._mmio)
        self.threads = [VcpuThread(v, bus, self._fatal, self.coalesced.drain)
                        for v in self.vcpus]

    @property
    def cpu_model(self) -> str:
        return self._cpu_model

    @property
    def running(self) -> bool:
        return self._running

    # -- devices ---------------------------------------------------------------------------

    def _port_out(self, port: int, size: int, value: int) -> None:
        if self.uart.handles(port):
            self.uart.write(port, value)
        elif port == PROBE_PORT and size == 4:
            try:
                raw = self.memory.read_phys(value, RECORD.size)
            except ValueError:
                raw = b""
            self.probe.report(raw)
        elif self.pci.handles(port):
            self.pci.out(port, size, value)
        elif (io := self.pci.io_device(port)) is not None:
            io[0].io_write(io[1], size, value)
        else:
            self.unknown_io += 1

    def _port_in(self, port: int, size: int) -> int:
        if self.uart.handles(port):
            return self.uart.read(port)
        if self.pci.handles(port):
            return self.pci.inp(port, size)
        if (io := self.pci.io_device(port)) is not None:
            return io[0].io_read(io[1], size)
        self.unknown_io += 1
        return (1 << (8 * size)) - 1

    def _mmio(self, addr: int, data: bytes | None, length: int) -> bytes:
        self.unknown_io += 1
        return b"\xff" * length

    def _device_error(self, why: str) -> None:
        """A device refused what the guest asked of it; the guest and the host go on."""
        self.device_errors.append(why)
        print(f"livemig: {why}", file=sys.stderr, flush=True)

    def hold_device_ram(self, hold: bool) -> None:
        """contract.hold_device_ram: the NICs keep their frames until released."""
        for nic in self.nics:
            nic.hold_ram(hold)

    def net_ports(self) -> list[VirtioNet]:
        """The NICs' host sides (contract.NetPort), for a network handover."""
        return list(self.nics)

    def _fatal(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self._running = False
        self.stopped.set()

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Boot the image, or run from a loaded state."""
        if self._started:
            raise MachineError("machine already started")
        if not self._state_loaded:
            image = multiboot.load(self.config.image, self.config.cmdline, self.memory)
            cpu.set_multiboot_entry(self.vcpus[0], image.entry, image.info_addr,
                                    multiboot.BOOT_MAGIC)
        self._started = True
        self.coalesced.start()
        for t in self.threads:
            t.start(paused=False)
        self._running = True
        for nic in self.nics:
            nic.resume()

    def pause(self) -> None:
        if not self._started:
            return
        for t in self.threads:
            t.pause()
        for t in self.threads:
            t.wait_parked()
        self.coalesced.drain()  # what a vCPU wrote before it parked
        for nic in self.nics:
            nic.pause()
        self.uart.flush()
        self._running = False

    def resume(self) -> None:
        if self.error:
            raise MachineError(f"cannot resume: {self.error}")
        if not self._started:
            raise MachineError("machine not started")
        for nic in self.nics:
            nic.resume()
        for t in self.threads:
            t.release()
        self._running = True

    def set_throttle(self, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 0.99)
        self._throttle = fraction
        for t in self.threads:
            t.throttle = fraction
        if fraction > 0 and self._throttle_thread is None:
            self._throttle_thread = threading.Thread(target=self._throttle_loop,
                                                     name="throttle", daemon=True)
            self._throttle_thread.start()

    def _throttle_loop(self) -> None:
        while self._throttle > 0 and not self.stopped.is_set():
            time.sleep(THROTTLE_SLICE)
            if self._running:
                for t in self.threads:
                    t.kick()
        self._throttle_thread = None

    def close(self) -> None:
        self._throttle = 0.0
        for t in self.threads:
            t.stop()
        self.coalesced.stop()
        self.uart.flush()
        self._running = False
        self.stopped.set()
        for nic in self.nics:
            nic.close()
        for v in self.vcpus:
            v.close()
        self.vm.close()
        self.kvm.close()
        self.memory.close()

    # -- state -----------------------------------------------------------------------------

    def save_state(self) -> MachineState:
        if self._running:
            raise MachineError("save_state needs a paused machine")
        try:
            vcpus = [cpu.save_vcpu(v, self._msrs) for v in self.vcpus]
            vm: dict[str, Any] = {n: self.vm.get_irqchip(i) for n, i in IRQCHIPS.items()}
            vm["pit2"] = self.vm.get_pit2()
            vm["clock"] = self.vm.get_clock()
        except KvmError as e:
            raise MachineError(f"state capture failed: {e}") from e
        devices = {"uart": self.uart.save(), "probe": self.probe.state()}
        if self.nics:
            devices["pci"] = self.pci.save()
            devices.update({nic.name: nic.save() for nic in self.nics})
        return MachineState(Arch.X86_64, self.cpu_model, vcpus, vm, devices)

    def load_state(self, state: MachineState) -> None:
        if self._running:
            raise MachineError("load_state needs a paused or new machine")
        state.check_compatible(Arch.X86_64, self.cpu_model, len(self.vcpus))
        for v in state.vcpus:
            cpu.check_vcpu_state(v, self._blob_sizes)
        for name in (*IRQCHIPS, "pit2", "clock"):
            if not isinstance(state.vm.get(name), bytes):
                raise StateError(f"VM state lacks {name!r}")
        self.uart.validate(state.devices.get("uart"))
        self._validate_nics(state.devices)
        try:
            self.vm.set_clock(state.vm["clock"])
            self.vm.set_pit2(state.vm["pit2"])
            for name in IRQCHIPS:
                self.vm.set_irqchip(state.vm[name])
            for vcpu, vstate in zip(self.vcpus, state.vcpus, strict=True):
                cpu.load_vcpu(vcpu, vstate)
        except KvmError as e:
            raise StateError(f"the host refused the saved state: {e}") from e
        self.uart.load(state.devices["uart"])
        if self.nics:
            self.pci.load(state.devices["pci"])
            for nic in self.nics:
                nic.load(state.devices[nic.name])
        self._state_loaded = True

    def _validate_nics(self, devices: dict[str, Any]) -> None:
        extra = sorted(k for k in devices if k.startswith("net")
                       and k not in {n.name for n in self.nics})
        if extra:
            raise StateError(f"state has NIC(s) {', '.join(extra)} that this machine lacks")
        if self.nics:
            self.pci.validate(devices.get("pci"))
            for nic in self.nics:
                nic.validate(devices.get(nic.name))
