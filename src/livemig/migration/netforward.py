"""Soft network handover: frames that reach the machine's old place are not lost.

From the switch-over on, the source machine's NICs keep their TAPs read (the guest is paused:
frames wait in the NIC, `NetPort.take_frames`). At COMMIT the source starts a `NetSender` on
the session's `net` connection: it sends every waiting frame and every frame that arrives
afterwards, as NET_FRAMES records, until no frame for the guest has arrived for `IDLE_S`
(the network has learnt the new place) or `BOUND_S` passed, then NET_END. At the destination
the machine is started, its NICs announce it (gratuitous ARP), and a `NetReceiver` injects
the forwarded frames into the guest's receive queues until NET_END.

    NET_FRAMES  msgpack {"port": int, "frames": [bytes]}
    NET_END     msgpack {"frames": int}   (frames sent in all)

Without the feature (`--no-soft-net`, or a peer that lacks it) the destination only announces,
as QEMU does, and what reached the old place during the switch-over is lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from livemig.contract import NetPort
from livemig.migration import records
from livemig.migration.channels import Channel
from livemig.migration.errors import MigrationError, ProtocolError
from livemig.migration.wire import RecordType

IDLE_S = 0.3  # no frame for the guest at the old place for this long: the network moved on
BOUND_S = 5.0  # forwarding never lasts longer than this after COMMIT
POLL_S = 0.02  # how long one wait for frames at a port lasts
MAX_BATCH = 256  # frames in one NET_FRAMES record
MAX_FRAME = 65550
SEND_TIMEOUT = 5.0


@dataclass
class NetStats:
    """What the handover forwarded (source) or injected (destination)."""

    frames: int = 0
    bytes: int = 0
    duration_ms: float = 0.0
    ended: str = ""  # idle, bound, end (NET_END received), or the error

    def to_json(self) -> dict[str, object]:
        return {"frames": self.frames, "bytes": self.bytes,
                "duration_ms": round(self.duration_ms, 3), "ended": self.ended}


class NetSender:
    """Source side: forwards what the paused machine's ports receive, on its own thread."""

    def __init__(self, chan: Channel, ports: Sequence[NetPort]) -> None:
        self.chan = chan
        self.ports = list(ports)
        self.stats = NetStats()
        self._thread = threading.Thread(target=self._run, name="net-forward", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self) -> NetStats:
        """Wait until forwarding ended (idle, bound or error) and the channel is closed."""
        self._thread.join(BOUND_S + SEND_TIMEOUT + 1)
        return self.stats

    def _run(self) -> None:
        t0 = time.monotonic()
        last = t0
        try:
            while True:
                now = time.monotonic()
                if now - t0 > BOUND_S:
                    self.stats.ended = "bound"
                    break
                if now - last > IDLE_S:
                    self.stats.ended = "idle"
                    break
                for i, port in enumerate(self.ports):
                    frames = port.take_frames(POLL_S / len(self.ports))
                    if frames:
                        self._send(i, frames)
                        if any(f[:6] == port.mac for f in frames):
                            last = time.monotonic()
            self.chan.send(RecordType.NET_END, records.pack({"frames": self.stats.frames}),
                           deadline=time.monotonic() + SEND_TIMEOUT)
        except MigrationError as e:
            self.stats.ended = f"error: {e}"
        finally:
            self.stats.duration_ms = (time.monotonic() - t0) * 1000
            self.chan.close()

    def _send(self, port: int, frames: list[bytes]) -> None:
        for k in range(0, len(frames), MAX_BATCH):
            batch = frames[k:k + MAX_BATCH]
            self.chan.send(RecordType.NET_FRAMES, records.pack({"port": port, "frames": batch}),
                           deadline=time.monotonic() + SEND_TIMEOUT)
            self.stats.frames += len(batch)
            self.stats.bytes += sum(len(f) for f in batch)


class NetReceiver:
    """Destination side: injects forwarded frames into the running machine's ports."""

    def __init__(self, chan: Channel, ports: Sequence[NetPort]) -> None:
        self.chan = chan
        self.ports = list(ports)
        self.stats = NetStats()
        self._thread = threading.Thread(target=self._run, name="net-inject", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout: float) -> NetStats:
        self._thread.join(timeout)
        return self.stats

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            while True:
                rec = self.chan.read(time.monotonic() + BOUND_S + SEND_TIMEOUT)
                if rec.type is RecordType.NET_END:
                    self.stats.ended = "end"
                    return
                if rec.type is not RecordType.NET_FRAMES:
                    raise ProtocolError(f"{rec.type.name} record on the net connection")
                port, frames = self._check(records.unpack(rec.payload, "NET_FRAMES",
                                                          ("port", "frames")))
                self.ports[port].inject(frames)
                self.stats.frames += len(frames)
                self.stats.bytes += sum(len(f) for f in frames)
        except (MigrationError, OSError) as e:
            self.stats.ended = f"error: {e}"
        finally:
            self.stats.duration_ms = (time.monotonic() - t0) * 1000
            self.chan.close()

    def _check(self, d: dict) -> tuple[int, list[bytes]]:
        port, frames = d["port"], d["frames"]
        if not isinstance(port, int) or not 0 <= port < len(self.ports):
            raise ProtocolError(f"NET_FRAMES record for port {port!r}, the machine has "
                                f"{len(self.ports)}")
        if not isinstance(frames, list) or len(frames) > MAX_BATCH or not all(
                isinstance(f, bytes) and 14 <= len(f) <= MAX_FRAME for f in frames):
            raise ProtocolError("NET_FRAMES record: frames are not a list of Ethernet frames")
        return port, frames
