"""One stats structure for every strategy (docs/stats.md), and progress snapshots.

`MigrationStats.to_json()` is the one JSON schema that `livemig migrate --json`, `livemig
bench --json` and the control socket's `query-migrate` all carry.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 2


@dataclass
class RoundStats:
    """One round: pages and bytes per codec, how long, what stayed dirty."""

    number: int
    pages: dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0
    duration_ms: float = 0.0
    dirty_pages: int = 0  # pages dirtied while this round was sent
    throttle: float = 0.0
    held_pages: int = 0  # owed but held back from this live round (--hold-hot)
    skipped_pages: int = 0  # owed, left out: dirtied again before the round got to them

    def add(self, codec: str, pages: int) -> None:
        if pages:
            self.pages[codec] = self.pages.get(codec, 0) + pages

    @property
    def bandwidth(self) -> float:
        """Bytes per second on the wire for this round."""
        return self.bytes_sent / (self.duration_ms / 1000) if self.duration_ms > 0 else 0.0


HISTOGRAM_US = (50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000)  # fault latency buckets


@dataclass
class FaultStats:
    """Post-copy: pages the destination asked for while running, how long each took (fault
    read to page installed), how long vCPUs were blocked in all, and what was pushed in
    order versus pulled by a fault; all zero for strategies that move every page first."""

    count: int = 0
    latency_ms: list[float] = field(default_factory=list)
    blocked_ms: float = 0.0  # summed over faults: vCPU time spent waiting (QEMU's blocktime)
    pushed: int = 0  # pages the source pushed after COMMIT
    pulled: int = 0  # pages it sent because a fault asked
    zero_filled: int = 0  # faults on pages the source never had: filled with zeroes there
    last_page_ms: float = 0.0  # since the start of the migration, when the last page landed
    recoveries: int = 0
    pulled_ahead: int = 0  # source: pages a fault asked for while still queued for a push
    queue_at_pull: int = 0  # source: most pages queued for pushing when a request came
    native: bool = False  # faults were served by the C loops (faultpath.py), not Python's

    def percentile(self, p: float) -> float | None:
        lat = sorted(self.latency_ms)
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None

    def histogram(self) -> dict[str, int]:
        """Faults per latency bucket: `<=50us`, ..., `>50000us`."""
        lat_us = np.asarray(self.latency_ms, dtype=float) * 1000
        edges = [0.0, *HISTOGRAM_US, float("inf")]
        counts, _ = np.histogram(lat_us, bins=edges)
        names = [f"<={b}us" for b in HISTOGRAM_US] + [f">{HISTOGRAM_US[-1]}us"]
        return dict(zip(names, (int(c) for c in counts), strict=True))

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count,
                "latency_ms": {"p50": self.percentile(0.5), "p90": self.percentile(0.9),
                               "p99": self.percentile(0.99), "max": self.percentile(1.0)},
                "histogram": self.histogram(), "blocked_ms": round(self.blocked_ms, 3),
                "pushed": self.pushed, "pulled": self.pulled, "zero_filled": self.zero_filled,
                "last_page_ms": round(self.last_page_ms, 3), "recoveries": self.recoveries,
                "pulled_ahead": self.pulled_ahead, "queue_at_pull": self.queue_at_pull,
                "native": self.native}

    @classmethod
    def from_json(cls, d: dict[str, Any], latency_ms: list[float]) -> FaultStats:
        """What a destination's COMPLETE carried (its own figures and every latency)."""
        return cls(int(d.get("count", 0)), [float(x) for x in latency_ms],
                   float(d.get("blocked_ms", 0.0)), int(d.get("pushed", 0)),
                   int(d.get("pulled", 0)), int(d.get("zero_filled", 0)),
                   float(d.get("last_page_ms", 0.0)), int(d.get("recoveries", 0)),
                   native=d.get("native") is True)


@dataclass
class MigrationStats:
    """What a migration did and how long it took, by phase and by event."""

    status: str = "setup"  # setup, active, completed, failed, cancelled, commit-unconfirmed
    mode: str = "precopy"
    security: str = "none"  # psk, tls, psk+tls, none
    session: str = ""  # the session id (hex), what `migrate-resolve` asks about
    stop_reason: str | None = None  # why live copy ended: converged, max-rounds, ...
    total_ms: float = 0.0
    setup_ms: float = 0.0
    downtime_ms: float = 0.0
    state_sent_ms: float = 0.0  # from the pause to STATE sent (QEMU's post-copy downtime span)
    rounds: list[RoundStats] = field(default_factory=list)
    bytes_sent: int = 0
    codec_bytes: dict[str, int] = field(default_factory=dict)
    codec_counters: dict[str, dict[str, int]] = field(default_factory=dict)  # cache hits, ...
    channels: dict[str, dict[str, Any]] = field(default_factory=dict)
    dirty_rate: float = 0.0  # pages/s dirtied, last live round
    bandwidth: float = 0.0  # bytes/s, whole migration
    throttle: float = 0.0  # highest throttle used
    guest_gap_ms: float | None = None
    verified_memory: bool | None = None  # None when not asked for
    error: str | None = None
    # Milliseconds in each phase (setup, live-copy, switchover, after-commit) and in each
    # step of the switch-over (pause, last-round, verify, save-state, until-ready, ...).
    phases_ms: dict[str, float] = field(default_factory=dict)
    switchover_ms: dict[str, float] = field(default_factory=dict)
    faults: FaultStats = field(default_factory=FaultStats)
    events: list[tuple[float, str]] = field(default_factory=list)
    net: dict[str, Any] = field(default_factory=dict)  # network handover (netforward.NetStats)
    _t0: float = field(default_factory=time.monotonic, repr=False)

    def event(self, what: str) -> None:
        """Note that `what` happened now (ms since the stats were made)."""
        self.events.append((round((time.monotonic() - self._t0) * 1000, 3), what))

    def pages(self) -> dict[str, int]:
        """Pages per codec over all rounds."""
        out: dict[str, int] = {}
        for r in self.rounds:
            for k, v in r.pages.items():
                out[k] = out.get(k, 0) + v
        return out

    def to_json(self) -> dict[str, Any]:
        """The documented object (docs/stats.md)."""
        pages = self.pages()
        return {
            "schema": SCHEMA_VERSION,
            "status": self.status,
            "mode": self.mode,
            "security": self.security,
            "session": self.session,
            "stop_reason": self.stop_reason,
            "total_ms": round(self.total_ms, 3),
            "downtime_ms": round(self.downtime_ms, 3),
            "state_sent_ms": round(self.state_sent_ms, 3),
            "setup_ms": round(self.setup_ms, 3),
            "rounds": len(self.rounds),
            "bytes_sent": self.bytes_sent,
            "pages": pages,
            "codecs": {k: {"pages": pages.get(k, 0), "bytes": self.codec_bytes.get(k, 0),
                           **self.codec_counters.get(k, {})}
                       for k in [*pages, *(c for c in self.codec_counters if c not in pages)]},
            "channels": self.channels,
            "machines": {"machine": {"pages": sum(pages.values()),
                                     "bytes_sent": self.bytes_sent}},
            "guest_gap_ms": None if self.guest_gap_ms is None else round(self.guest_gap_ms, 3),
            "verified_memory": self.verified_memory,
            "dirty_rate": round(self.dirty_rate, 1),
            "bandwidth": round(self.bandwidth, 1),
            "throttle": self.throttle,
            "error": self.error,
            "phases_ms": {k: round(v, 3) for k, v in self.phases_ms.items()},
            "switchover_ms": {k: round(v, 3) for k, v in self.switchover_ms.items()},
            "faults": self.faults.to_json(),
            "events": [{"t_ms": t, "event": e} for t, e in self.events],
            "round_detail": [asdict(r) for r in self.rounds],
            "net": self.net,
        }


@dataclass
class Progress:
    """A snapshot for progress displays, sent after every batch or so."""

    phase: str  # setup, round, switchover, done
    round: int
    sent_bytes: int
    round_pages_done: int
    round_pages_total: int
    bandwidth: float  # bytes/s, recent
    throttle: float
    note: str = ""  # why, for a phase that needs one (postcopy-paused)
