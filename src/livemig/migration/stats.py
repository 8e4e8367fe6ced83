"""One stats structure for every strategy, and the progress snapshots sent while migrating."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RoundStats:
    """One round: pages and bytes per encoding, how long, what stayed dirty."""

    number: int
    pages: dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0
    duration_ms: float = 0.0
    dirty_pages: int = 0  # pages dirtied while this round was sent
    throttle: float = 0.0

    def add(self, encoding: str, pages: int) -> None:
        if pages:
            self.pages[encoding] = self.pages.get(encoding, 0) + pages

    @property
    def bandwidth(self) -> float:
        """Bytes per second on the wire for this round."""
        return self.bytes_sent / (self.duration_ms / 1000) if self.duration_ms > 0 else 0.0


@dataclass
class MigrationStats:
    """What a migration did and how long it took; `to_json` is the CLI's --json object."""

    status: str = "setup"  # setup, active, completed, failed, cancelled, commit-unconfirmed
    mode: str = "precopy"
    total_ms: float = 0.0
    setup_ms: float = 0.0
    downtime_ms: float = 0.0
    rounds: list[RoundStats] = field(default_factory=list)
    bytes_sent: int = 0
    dirty_rate: float = 0.0  # pages/s dirtied, last live round
    bandwidth: float = 0.0  # bytes/s, whole migration
    throttle: float = 0.0  # highest throttle used
    guest_gap_ms: float | None = None
    verified_memory: bool | None = None  # None when not asked for
    error: str | None = None
    # Milliseconds spent in each step of the switch-over (pause, last-round, verify, state, ...).
    switchover_ms: dict[str, float] = field(default_factory=dict)

    def pages(self) -> dict[str, int]:
        """Pages per encoding over all rounds."""
        out: dict[str, int] = {}
        for r in self.rounds:
            for k, v in r.pages.items():
                out[k] = out.get(k, 0) + v
        return out

    def to_json(self) -> dict[str, Any]:
        """The summary object of `livemig migrate --json`, plus per-round detail."""
        return {
            "status": self.status,
            "mode": self.mode,
            "total_ms": round(self.total_ms, 3),
            "downtime_ms": round(self.downtime_ms, 3),
            "setup_ms": round(self.setup_ms, 3),
            "rounds": len(self.rounds),
            "bytes_sent": self.bytes_sent,
            "pages": self.pages(),
            "guest_gap_ms": None if self.guest_gap_ms is None else round(self.guest_gap_ms, 3),
            "verified_memory": self.verified_memory,
            "dirty_rate": round(self.dirty_rate, 1),
            "bandwidth": round(self.bandwidth, 1),
            "throttle": self.throttle,
            "error": self.error,
            "switchover_ms": {k: round(v, 3) for k, v in self.switchover_ms.items()},
            "round_detail": [asdict(r) for r in self.rounds],
        }


@dataclass
class Progress:
    """A snapshot for progress displays, sent after every batch or so."""

    phase: str  # setup, round, switchover, done
    round: int
    sent_bytes: int
    round_pages_done: int
    round_pages_total: int
    remaining_pages: int  # dirty pages known to be waiting beyond this round
    bandwidth: float  # bytes/s, recent
    throttle: float
