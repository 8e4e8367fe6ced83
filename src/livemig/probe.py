"""The probe device's guest ABI and the host-side log of what guests report.

A guest reports by handing the probe device the guest-physical address of a 32-byte record
(x86: a 32-bit `out` to I/O port PROBE_PORT; ARMv8: a 64-bit store to PROBE_MMIO_BASE).
The record, little-endian:

    u32 magic  = PROBE_MAGIC ('LMPR')
    u32 kind   = ProbeKind
    u32 vcpu   = reporting CPU's index (0 = boot CPU)
    u32 pad
    u64 value  = counter (HEARTBEAT), check count (OK), failing page/register (FAIL)
    u64 aux    = workload-specific detail

One exit per report and no latched state, so a report can never be torn by a pause.
See docs/guest-abi.md.
"""

from __future__ import annotations

import enum
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

PROBE_PORT = 0x700
PROBE_MMIO_BASE = 0x0A00_0000
PROBE_MAGIC = 0x52504D4C
RECORD = struct.Struct("<IIIIQQ")


class ProbeKind(enum.IntEnum):
    """What a probe record reports."""

    BOOT = 1  # workload started; value = workload id, aux = number of CPUs running it
    HEARTBEAT = 2  # progress; value = monotonically increasing counter
    OK = 3  # a full check passed; value = number of checks so far
    FAIL = 4  # a check failed; value = page or register index, aux = detail


@dataclass(frozen=True)
class ProbeEvent:
    """One report, stamped with host wall-clock time when it arrived."""

    time: float
    kind: ProbeKind
    vcpu: int
    value: int
    aux: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "kind": self.kind.name.lower(),
            "vcpu": self.vcpu,
            "value": self.value,
            "aux": self.aux,
        }


class ProbeLog:
    """Host-side record of probe reports; thread-safe, bounded."""

    def __init__(self, keep: int = 4096) -> None:
        self._lock = threading.Lock()
        self._events: deque[ProbeEvent] = deque(maxlen=keep)
        self.counts: dict[ProbeKind, int] = {k: 0 for k in ProbeKind}
        self.bad_records = 0
        self.first_failure: ProbeEvent | None = None

    def report(self, raw: bytes) -> ProbeEvent | None:
        """Decode one guest record; malformed records are counted, never raised."""
        if len(raw) < RECORD.size:
            self.bad_records += 1
            return None
        magic, kind, vcpu, _pad, value, aux = RECORD.unpack_from(raw)
        if magic != PROBE_MAGIC or kind not in ProbeKind._value2member_map_:
            self.bad_records += 1
            return None
        ev = ProbeEvent(time.time(), ProbeKind(kind), vcpu, value, aux)
        with self._lock:
            self._events.append(ev)
            self.counts[ev.kind] += 1
            if ev.kind is ProbeKind.FAIL and self.first_failure is None:
                self.first_failure = ev
        return ev

    def events(self, kind: ProbeKind | None = None) -> list[ProbeEvent]:
        with self._lock:
            return [e for e in self._events if kind is None or e.kind is kind]

    def last(self, kind: ProbeKind = ProbeKind.HEARTBEAT) -> ProbeEvent | None:
        with self._lock:
            for e in reversed(self._events):
                if e.kind is kind:
                    return e
        return None

    def summary(self) -> dict[str, Any]:
        """What `status` shows: counts per kind, last heartbeat, first failure."""
        last = self.last()
        return {
            "counts": {k.name.lower(): n for k, n in self.counts.items()},
            "last_heartbeat": last.to_dict() if last else None,
            "first_failure": self.first_failure.to_dict() if self.first_failure else None,
            "bad_records": self.bad_records,
        }

    def state(self) -> dict[str, Any]:
        """Carried across a migration so the destination can measure the guest-visible gap."""
        last = self.last()
        return {"last_heartbeat": last.to_dict() if last else None}
