"""A virtio-net NIC (legacy virtio over PCI, one I/O BAR) backed by a host TAP device.

Register file at BAR0 (virtio 0.9.5 "legacy" layout): host features, guest features, queue
PFN, queue size, queue select, queue notify, device status, ISR, then the device config (MAC,
link status). Queue 0 receives, queue 1 transmits; descriptors, avail and used rings are in
guest RAM in the legacy layout (4096-byte alignment). There are no interrupts: the guest polls
the used rings and asks the device to look at a queue by writing its number to QUEUE_NOTIFY.

Frames from the TAP are read by one host thread and, while the machine runs, written into the
receive buffers the guest gave; while it is paused they wait in a bounded queue (which a
network handover takes them from: `take_frames`). A guest that points a queue or a buffer
outside RAM gets no further service from the device (status DEVICE_NEEDS_RESET) and one error
line; the machine and the host go on.
"""

from __future__ import annotations

import collections
import os
import select
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from livemig.contract import StateError
from livemig.machine.memory import GuestRam
from livemig.machine.pci import PciDevice
from livemig.machine.tap import Tap, format_mac

VENDOR_VIRTIO = 0x1AF4
DEVICE_LEGACY_NET = 0x1000
SUBSYS_NET = 1
CLASS_ETHERNET = 0x020000

F_MAC = 1 << 5
F_STATUS = 1 << 16
HOST_FEATURES = F_MAC | F_STATUS
LINK_UP = 1
STATUS_NEEDS_RESET = 0x40

QUEUE_SIZE = 256
RX, TX = 0, 1
DESC_NEXT, DESC_WRITE, DESC_INDIRECT = 1, 2, 4
NET_HDR = 10  # legacy virtio_net_hdr without num_buffers (MRG_RXBUF is not offered)
MAX_PENDING = 4096  # frames waiting for the guest (paused, or no receive buffer)
RING_ALIGN = 4096
RETRY_S = 0.002  # how soon frames that found no receive buffer are tried again

REG_HOST_FEATURES, REG_GUEST_FEATURES, REG_QUEUE_PFN = 0x00, 0x04, 0x08
REG_QUEUE_NUM, REG_QUEUE_SEL, REG_QUEUE_NOTIFY = 0x0C, 0x0E, 0x10
REG_STATUS, REG_ISR, REG_CONFIG = 0x12, 0x13, 0x14

ETH_ARP, ETH_IPV4, ETH_RARP = 0x0806, 0x0800, 0x8035
BROADCAST = b"\xff" * 6


class RingError(Exception):
    """The guest's rings point somewhere the device may not go."""


@dataclass
class Queue:
    """One virtqueue: where the guest put it and how far the device has gone."""

    pfn: int = 0
    last_avail: int = 0  # next avail entry the device will take (device-internal)
    used_idx: int = 0  # the device's copy of the used index it last published

    def layout(self) -> tuple[int, int, int, int]:
        """Guest-physical addresses of descriptors, avail ring, used ring, and the end."""
        desc = self.pfn * RING_ALIGN
        avail = desc + 16 * QUEUE_SIZE
        used = (avail + 6 + 2 * QUEUE_SIZE + RING_ALIGN - 1) & ~(RING_ALIGN - 1)
        return desc, avail, used, used + 6 + 8 * QUEUE_SIZE


@dataclass
class NetRegs:
    """What the guest programmed (write-only QUEUE_NOTIFY holds nothing to keep)."""

    guest_features: int = 0
    status: int = 0
    isr: int = 0
    queue_sel: int = 0


class VirtioNet(PciDevice):
    """The NIC: a PCI function, its virtqueues, and the TAP behind it."""

    def __init__(self, name: str, mac: bytes, tap: Tap, ram: GuestRam,
                 on_error: Callable[[str], None]) -> None:
        super().__init__(VENDOR_VIRTIO, DEVICE_LEGACY_NET, CLASS_ETHERNET, VENDOR_VIRTIO,
                         SUBSYS_NET)
        self.name = name
        self.mac = mac
        self.tap = tap
        self.ram = ram
        self.on_error = on_error
        self.regs = NetRegs()
        self.queues = [Queue(), Queue()]
        self.error = ""
        self.learned_ip = b""  # the guest's IPv4 address, seen in frames it sent
        self.counters = collections.Counter[str]()
        self._pending: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._paused = True
        self._held = False  # contract.hold_device_ram: no access to guest RAM at all
        self._closing = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._rx_loop, name=f"{name}-rx", daemon=True)
        self._thread.start()

    # -- register file ---------------------------------------------------------------------

    def _config_bytes(self) -> bytes:
        return self.mac + struct.pack("<H", LINK_UP)

    def io_read(self, off: int, size: int) -> int:
        r = self.regs
        if off >= REG_CONFIG:
            return int.from_bytes(self._config_bytes()[off - REG_CONFIG:off - REG_CONFIG + size]
                                  .ljust(size, b"\xff"), "little")
        if off == REG_HOST_FEATURES:
            return HOST_FEATURES
        if off == REG_GUEST_FEATURES:
            return r.guest_features
        if off == REG_QUEUE_PFN:
            return self.queues[r.queue_sel].pfn if r.queue_sel < 2 else 0
        if off == REG_QUEUE_NUM:
            return QUEUE_SIZE if r.queue_sel < 2 else 0
        if off == REG_QUEUE_SEL:
            return r.queue_sel
        if off == REG_STATUS:
            return r.status
        if off == REG_ISR:
            isr, r.isr = r.isr, 0
            return isr
        return (1 << (8 * size)) - 1

    def io_write(self, off: int, size: int, value: int) -> None:
        r = self.regs
        if off == REG_GUEST_FEATURES:
            r.guest_features = value & HOST_FEATURES
        elif off == REG_QUEUE_PFN and r.queue_sel < 2:
            self._set_pfn(r.queue_sel, value & 0xFFFF_FFFF)
        elif off == REG_QUEUE_SEL:
            r.queue_sel = value & 0xFFFF
        elif off == REG_QUEUE_NOTIFY:
            self._notify(value & 0xFFFF)
        elif off == REG_STATUS:
            if value & 0xFF == 0:
                self._reset()
            else:
                r.status = (value & 0xFF) | (r.status & STATUS_NEEDS_RESET)

    def _set_pfn(self, q: int, pfn: int) -> None:
        with self._lock:
            self.queues[q] = Queue(pfn)
            if pfn:
                desc, _, _, end = self.queues[q].layout()
                try:
                    self.ram.phys_to_offset(desc, end - desc)
                except ValueError:
                    self._broken(f"the guest put queue {q} at {desc:#x}-{end:#x}, which is "
                                 "not RAM")

    def _reset(self) -> None:
        with self._lock:
            self.regs = NetRegs()
            self.queues = [Queue(), Queue()]
            self.error = ""

    def _broken(self, why: str) -> None:
        """Stop serving a guest whose rings are wrong: one error, no crash (lock held)."""
        if not self.error:
            self.error = f"{self.name}: {why}; the NIC stops until the guest resets it"
            self.regs.status |= STATUS_NEEDS_RESET
            self.on_error(self.error)

    def _live(self, q: int) -> bool:
        return (not self.error and self.queues[q].pfn != 0
                and self.regs.status & 0x4 != 0)  # DRIVER_OK

    # -- rings -----------------------------------------------------------------------------

    def _u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.ram.read_phys(gpa, 2))[0]

    def _pop(self, q: Queue) -> tuple[int, list[tuple[int, int, int]]] | None:
        """The next chain the guest made available: head and (addr, len, flags) each."""
        desc, avail, _, _ = q.layout()
        idx = self._u16(avail + 2)
        if idx == q.last_avail:
            return None
        if (idx - q.last_avail) & 0xFFFF > QUEUE_SIZE:
            raise RingError(f"avail index {idx} is more than a ring ahead of {q.last_avail}")
        head = self._u16(avail + 4 + 2 * (q.last_avail % QUEUE_SIZE))
        chain, i = [], head
        for _ in range(QUEUE_SIZE):
            if i >= QUEUE_SIZE:
                raise RingError(f"descriptor index {i} is outside the ring")
            addr, length, flags, nxt = struct.unpack("<QIHH", self.ram.read_phys(desc + 16 * i,
                                                                                 16))
            if flags & DESC_INDIRECT:
                raise RingError("indirect descriptor, a feature that was not negotiated")
            self.ram.phys_to_offset(addr, max(length, 1))
            chain.append((addr, length, flags))
            if not flags & DESC_NEXT:
                break
            i = nxt
        else:
            raise RingError("descriptor chain loops")
        q.last_avail = (q.last_avail + 1) & 0xFFFF
        return head, chain

    def _no_notify(self, q: Queue) -> None:
        """Tell the guest it need not notify this queue (VRING_USED_F_NO_NOTIFY): the device
        looks at it by itself (receive: while frames wait; transmit: never, so not used)."""
        _, _, used, _ = q.layout()
        if self._u16(used) != 1:
            self.ram.write_phys(used, struct.pack("<H", 1))

    def _push(self, q: Queue, head: int, written: int) -> None:
        _, _, used, _ = q.layout()
        self.ram.write_phys(used + 4 + 8 * (q.used_idx % QUEUE_SIZE),
                            struct.pack("<II", head, written))
        q.used_idx = (q.used_idx + 1) & 0xFFFF
        self.ram.write_phys(used + 2, struct.pack("<H", q.used_idx))

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except (RingError, ValueError) as e:
            self._broken(f"bad ring from the guest: {e}")

    # -- transmit (vCPU thread, on QUEUE_NOTIFY) ------------------------------------------

    def _notify(self, q: int) -> None:
        if q == TX:
            with self._lock:
                if self._live(TX) and not self._held:  # held: sent once released
                    self._guarded(self._transmit)
        elif q == RX:
            self._wake()  # new receive buffers: frames that waited for them can go in

    def _transmit(self) -> None:
        q = self.queues[TX]
        while (got := self._pop(q)) is not None:
            head, chain = got
            data = b"".join(self.ram.read_phys(a, n) for a, n, f in chain
                            if not f & DESC_WRITE)
            frame = data[NET_HDR:]
            if len(frame) >= 14:
                self._snoop(frame)
                self.counters["tx" if self.tap.write(frame) else "tx_dropped"] += 1
            self._push(q, head, 0)

    def _snoop(self, frame: bytes) -> None:
        """Learn the guest's IPv4 address from what it sends (for announcements)."""
        kind = struct.unpack_from(">H", frame, 12)[0]
        if kind == ETH_ARP and len(frame) >= 42 and frame[22:28] == self.mac:
            ip = frame[28:32]
        elif kind == ETH_IPV4 and len(frame) >= 34 and frame[6:12] == self.mac:
            ip = frame[26:30]
        else:
            return
        if any(ip):
            self.learned_ip = ip

    # -- receive (the NIC's thread) --------------------------------------------------------

    def _rx_loop(self) -> None:
        while not self._closing:
            # Frames waiting for receive buffers are retried soon: the guest does not notify.
            wait = RETRY_S if self._pending and not self._paused else 0.5
            try:
                ready, _, _ = select.select([self.tap.fd, self._wake_r], [], [], wait)
            except (OSError, ValueError):
                return  # closed under us
            if self._wake_r in ready:
                while True:
                    try:
                        if not os.read(self._wake_r, 512):
                            break
                    except BlockingIOError:
                        break
            frames: list[bytes] = []
            if self.tap.fd in ready:
                while len(frames) < 256 and (f := self.tap.read()) is not None:
                    frames.append(f)
            with self._lock:
                self._queue(frames)
                self._deliver()

    def _queue(self, frames: Sequence[bytes]) -> None:
        for f in frames:
            if len(self._pending) >= MAX_PENDING:
                self.counters["rx_dropped"] += 1
            else:
                self._pending.append(f)
        if frames:
            self._arrived.notify_all()

    def _deliver(self) -> None:
        if self._paused or self._held or not self._live(RX):
            return
        q = self.queues[RX]
        self._guarded(lambda: self._no_notify(q))
        while self._pending:
            try:
                got = self._pop(q)
            except (RingError, ValueError) as e:
                self._broken(f"bad receive ring from the guest: {e}")
                return
            if got is None:
                return  # no buffer: wait for the guest to give some (QUEUE_NOTIFY 0)
            head, chain = got
            data = bytes(NET_HDR) + self._pending.popleft()
            done = 0
            for addr, length, flags in chain:
                if flags & DESC_WRITE and done < len(data):
                    part = data[done:done + length]
                    self.ram.write_phys(addr, part)
                    done += len(part)
            self.counters["rx" if done == len(data) else "rx_truncated"] += 1
            self._push(q, head, done)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass

    # -- life cycle ------------------------------------------------------------------------

    def pause(self) -> None:
        """From now on nothing touches guest RAM; frames from the TAP wait."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            if self._live(TX) and not self._held:
                self._guarded(self._transmit)  # what the guest queued before a migration
        self._wake()

    def hold_ram(self, hold: bool) -> None:
        """Keep off guest RAM while `hold` (post-copy); on release, send what the guest
        queued meanwhile and deliver what waited."""
        with self._lock:
            self._held = hold
            if not hold and not self._paused and self._live(TX):
                self._guarded(self._transmit)
        self._wake()

    def close(self) -> None:
        self._closing = True
        self._wake()
        self._thread.join(timeout=2)
        self.tap.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- NetPort (network handover) --------------------------------------------------------

    def take_frames(self, timeout: float) -> list[bytes]:
        with self._arrived:
            if not self._pending:
                self._arrived.wait(timeout)
            out = list(self._pending)
            self._pending.clear()
        return out

    def inject(self, frames: Sequence[bytes]) -> None:
        with self._lock:
            self._queue(frames)
        self._wake()

    def announce(self) -> None:
        if self.learned_ip:  # gratuitous ARP request: sender and target are the guest
            arp = struct.pack(">HHBBH", 1, ETH_IPV4, 6, 4, 1) + self.mac + self.learned_ip \
                + bytes(6) + self.learned_ip
            frame = BROADCAST + self.mac + struct.pack(">H", ETH_ARP) + arp
        else:  # RARP "request reverse", as QEMU announces
            rarp = struct.pack(">HHBBH", 1, ETH_IPV4, 6, 4, 3) + self.mac + bytes(4) \
                + self.mac + bytes(4)
            frame = BROADCAST + self.mac + struct.pack(">H", ETH_RARP) + rarp
        self.tap.write(frame.ljust(60, b"\0"))
        self.counters["announce"] += 1

    # -- state -----------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return {"config": bytes(self.config), "mac": self.mac, "regs": asdict(self.regs),
                "queues": [[q.pfn, q.last_avail, q.used_idx] for q in self.queues],
                "learned_ip": self.learned_ip, "error": self.error}

    def validate(self, state: object) -> None:
        """Raise StateError naming what is wrong with a saved NIC map, before any change."""
        n = self.name
        if not isinstance(state, dict):
            raise StateError(f"device state lacks the NIC {n}")
        cfg, mac, regs, queues = (state.get(k) for k in ("config", "mac", "regs", "queues"))
        if not isinstance(cfg, bytes) or len(cfg) != len(self.config):
            raise StateError(f"{n} state: config space is not {len(self.config)} bytes")
        if mac != self.mac:
            raise StateError(f"{n} state is for MAC {_mac_text(mac)}, this NIC has "
                             f"{format_mac(self.mac)}")
        if not isinstance(regs, dict) or set(regs) != set(asdict(NetRegs())) or not all(
                isinstance(v, int) and 0 <= v <= 0xFFFF_FFFF for v in regs.values()):
            raise StateError(f"{n} state: registers are missing or malformed")
        if not isinstance(queues, list) or len(queues) != 2 or not all(
                isinstance(q, list) and len(q) == 3 and all(isinstance(x, int) for x in q)
                for q in queues):
            raise StateError(f"{n} state: queues are malformed")
        for i, (pfn, last_avail, used_idx) in enumerate(queues):
            if not 0 <= pfn < 1 << 32 or not 0 <= last_avail <= 0xFFFF \
                    or not 0 <= used_idx <= 0xFFFF:
                raise StateError(f"{n} state: queue {i} is out of range")
        if not isinstance(state.get("learned_ip", b""), bytes) \
                or not isinstance(state.get("error", ""), str):
            raise StateError(f"{n} state: learned_ip or error is malformed")

    def load(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.config[:] = state["config"]
            self.regs = NetRegs(**{k: int(v) for k, v in state["regs"].items()})
            self.queues = [Queue(*q) for q in state["queues"]]
            self.learned_ip = state.get("learned_ip", b"")
            self.error = state.get("error", "")


def _mac_text(mac: object) -> str:
    return format_mac(mac) if isinstance(mac, bytes) and len(mac) == 6 else repr(mac)
