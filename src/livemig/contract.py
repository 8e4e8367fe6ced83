"""The Machine contract: what the migration engine may know about a machine.

The engine (`livemig.migration`) imports this module and nothing of a backend. Each backend
(`livemig.machine` for x86-64 on KVM, `livemig.arm` for the emulated ARMv8 board) implements
`Machine` and `GuestMemory`. When a feature needs something new from a machine, it is added here
and every backend implements it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import msgpack
import numpy as np

from livemig.probe import ProbeLog

PAGE_SIZE = 4096

# Bumped whenever the layout of MachineState or of any backend's state blob changes.
STATE_FORMAT_VERSION = 1


class MachineError(Exception):
    """Base of every error a machine reports; the message is meant for the user as is."""


class ConfigError(MachineError):
    """The configuration asks for something this host or backend cannot give."""


class ImageError(MachineError):
    """The guest image is missing or not in a format the loader understands."""


class StateError(MachineError):
    """A saved state cannot be loaded here (version, architecture, CPU model, damage)."""


class Arch(enum.Enum):
    """Guest architecture; a state is only ever loaded into a machine of the same one."""

    X86_64 = "x86_64"
    ARM64 = "arm64"


class BackingKind(enum.Enum):
    """Where a machine's RAM comes from."""

    FRESH = "fresh"  # a new memfd, all zero
    ADOPTED = "adopted"  # the memfd of another process's machine, handed over (SCM_RIGHTS)
    TEMPLATE = "template"  # a template's memory file, mapped copy-on-write (private)
    PREPARED = "prepared"  # a zero-filled RAM file this process populated ahead (rampool)


@dataclass(frozen=True)
class MemoryBacking:
    """How to make a machine's RAM: a property of one process's machine, never serialised.

    ADOPTED: `fds` are the RAM memfds another process sent (the machine takes them over and
    shares them with that process, so it never frees their pages). TEMPLATE: `path` is a
    template memory file of exactly the RAM size; pages the guest never writes stay the
    file's, shared with every other machine mapping it. PREPARED: `fds` is one zero-filled
    RAM file of at least the RAM size, every page already allocated (`listen --prealloc`); the
    machine owns it from then on and trims it to its size."""

    kind: BackingKind = BackingKind.FRESH
    fds: tuple[int, ...] = ()
    path: str = ""


@dataclass
class MachineConfig:
    """What a machine is made of: enough to build an identical, empty one elsewhere."""

    arch: Arch
    mem_size: int
    vcpus: int = 1
    image: str = ""
    cmdline: str = ""
    nics: list[str] = field(default_factory=list)  # MAC of each virtio-net NIC, in slot order
    # How this process makes RAM (not part of what is sent: each side chooses its own).
    backing: MemoryBacking = field(default_factory=MemoryBacking)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "arch": self.arch.value,
            "mem_size": self.mem_size,
            "vcpus": self.vcpus,
            "image": self.image,
            "cmdline": self.cmdline,
        }
        if self.nics:  # only then: a peer without NICs reads the same map as before
            d["nics"] = list(self.nics)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MachineConfig:
        try:
            return cls(
                arch=Arch(d["arch"]),
                mem_size=int(d["mem_size"]),
                vcpus=int(d["vcpus"]),
                image=str(d.get("image", "")),
                cmdline=str(d.get("cmdline", "")),
                nics=[str(m) for m in d.get("nics", [])],
            )
        except (KeyError, ValueError, TypeError) as e:
            raise StateError(f"malformed machine config: {e}") from e


# Each vCPU's and the VM's state is a flat map of named blobs (bytes, ints, lists of ints, ...),
# each backend documenting its names. Keeping the tree this shape lets it be written with
# msgpack and compared field by field without the engine knowing what the fields mean.
StateMap = dict[str, Any]


@dataclass
class MachineState:
    """Everything but RAM: per-vCPU, VM-level and device state, with what it belongs to."""

    arch: Arch
    cpu_model: str
    vcpus: list[StateMap]
    vm: StateMap = field(default_factory=dict)
    devices: dict[str, StateMap] = field(default_factory=dict)
    version: int = STATE_FORMAT_VERSION

    def encode(self) -> bytes:
        """Serialise with msgpack (no pickle): a map with the keys of this dataclass."""
        return msgpack.packb(
            {
                "version": self.version,
                "arch": self.arch.value,
                "cpu_model": self.cpu_model,
                "vcpus": self.vcpus,
                "vm": self.vm,
                "devices": self.devices,
            },
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> MachineState:
        """Inverse of `encode`; raises StateError on damaged input or another format version."""
        try:
            d = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises several unrelated types on bad input
            raise StateError(f"machine state is not valid msgpack: {e}") from e
        if not isinstance(d, dict) or "version" not in d:
            raise StateError("machine state has no version field")
        if d["version"] != STATE_FORMAT_VERSION:
            raise StateError(
                f"machine state has format version {d['version']}, "
                f"this livemig reads version {STATE_FORMAT_VERSION}"
            )
        try:
            return cls(
                arch=Arch(d["arch"]),
                cpu_model=str(d["cpu_model"]),
                vcpus=list(d["vcpus"]),
                vm=dict(d["vm"]),
                devices=dict(d["devices"]),
                version=int(d["version"]),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise StateError(f"malformed machine state: {e}") from e

    def check_compatible(self, arch: Arch, cpu_model: str, vcpus: int) -> None:
        """Raise StateError unless this state fits a machine of that arch, CPU model and size."""
        if self.arch is not arch:
            raise StateError(
                f"state is for a {self.arch.value} machine, this machine is {arch.value}"
            )
        if self.cpu_model != cpu_model:
            raise StateError(
                f"state is for CPU model {self.cpu_model!r}, this machine has {cpu_model!r}"
            )
        if len(self.vcpus) != vcpus:
            raise StateError(f"state has {len(self.vcpus)} vCPUs, this machine has {vcpus}")


@runtime_checkable
class GuestMemory(Protocol):
    """Guest RAM as one host mapping, page-indexed, with dirty tracking."""

    size: int
    page_size: int
    fd: int | None  # memfd behind RAM when it can be handed over, else None

    def view(self) -> memoryview:
        """Writable host mapping of all of RAM; byte i is guest RAM offset i."""
        ...

    def start_dirty_log(self) -> None:
        """Begin tracking writes; every page counts as clean from now."""
        ...

    def fetch_dirty(self) -> np.ndarray:
        """Bool per page: written (by guest or hypervisor) since the last fetch; clears."""
        ...

    def stop_dirty_log(self) -> None: ...

    def data_pages(self) -> np.ndarray:
        """Bool per page: may hold non-zero data (False only where RAM was never written)."""
        ...

    def template_deltas(self) -> np.ndarray | None:
        """Bool per page: no longer the template's (written since the machine was made from
        it); None when RAM is not template-backed."""
        ...

    def hand_over(self) -> list[int]:
        """The memfds holding RAM, for another process to map ([] when RAM cannot be handed
        over, e.g. a private template mapping). From this call on, RAM is shared with that
        process: `close` unmaps it but never frees its pages."""
        ...


@runtime_checkable
class Machine(Protocol):
    """A machine the engine can pause, capture, rebuild and resume."""

    config: MachineConfig
    probe: ProbeLog  # heartbeats and results the guest reported, host-timestamped
    error: str | None  # why the guest stopped by itself (crash, failed VM entry), else None

    @property
    def memory(self) -> GuestMemory:
        """Guest RAM."""
        ...

    @property
    def cpu_model(self) -> str:
        """Names the CPU a saved state is bound to; loading needs an equal model."""
        ...

    def start(self) -> None:
        """Boot the image (fresh machine) or run from loaded state."""
        ...

    def pause(self) -> None:
        """Return once every vCPU is parked outside guest mode."""
        ...

    def resume(self) -> None: ...

    @property
    def running(self) -> bool: ...

    def save_state(self) -> MachineState:
        """Capture vCPU, VM-level and device state; the machine must be paused."""
        ...

    def load_state(self, state: MachineState) -> None:
        """Adopt a saved state; raises StateError before changing anything if it cannot."""
        ...

    def set_throttle(self, fraction: float) -> None:
        """Keep vCPUs out of guest mode for `fraction` (0..0.99) of the time (auto-converge)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class NetPort(Protocol):
    """The host side of one guest NIC, for a network handover: frames that reach the machine's
    old place while it moves are taken there and injected at its new place."""

    name: str  # "net0"
    mac: bytes

    def take_frames(self, timeout: float) -> list[bytes]:
        """Frames for the guest that arrived while it was paused (and since), oldest first;
        waits up to `timeout` seconds for the first when there is none. Only while paused."""
        ...

    def inject(self, frames: Sequence[bytes]) -> None:
        """Queue frames for the guest's receive queue (delivered once the guest runs)."""
        ...

    def announce(self) -> None:
        """Tell the network where the guest now is: a gratuitous ARP from its MAC (a RARP
        when its IPv4 address is unknown), sent on the host side."""
        ...


def hold_device_ram(machine: Machine, hold: bool) -> None:
    """While held, no device of the machine reads or writes guest RAM from a host thread
    (they wait): under post-copy a missing page would block such a thread while it holds the
    GIL that the fault handler needs. Optional in the contract (a backend whose devices never
    touch RAM from host threads lacks it)."""
    fn = getattr(machine, "hold_device_ram", None)
    if fn is not None:
        fn(hold)


def net_ports(machine: Machine) -> list[NetPort]:
    """The machine's network ports; none for a backend without NICs (`net_ports` is
    optional in the contract)."""
    fn = getattr(machine, "net_ports", None)
    return list(fn()) if fn is not None else []
