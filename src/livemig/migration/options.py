"""What the user asks of a migration."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from livemig.units import parse_rate as _parse_rate


class Mode(enum.Enum):
    """Migration strategy."""

    STOP_COPY = "stop-copy"
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"  # pause, move CPU state, run there; memory follows (pushed, pulled)
    HYBRID = "hybrid"  # pre-copy rounds, then post-copy for what is left

    @property
    def postcopy(self) -> bool:
        """Whether the guest runs at the destination before all its memory is there."""
        return self in (Mode.POSTCOPY, Mode.HYBRID)
    HANDOVER = "handover"  # same host: RAM memfds handed over, only state sent
    TLM = "tlm"  # template-aware pre-copy: a clone sends only its pages not the template's


@dataclass
class MigrationOptions:
    """Source-side options; defaults follow QEMU's."""

    mode: Mode = Mode.PRECOPY
    max_downtime_ms: float = 300.0
    max_bandwidth: float | None = None  # bytes/s, None = unlimited
    max_rounds: int = 30
    auto_converge: bool = False
    verify_memory: bool = False
    throttle_initial: float = 0.20
    throttle_increment: float = 0.10
    throttle_max: float = 0.99
    # A round "shrinks" when it leaves fewer than this fraction of the previous round's pages.
    shrink_ratio: float = 0.95
    commit_timeout_s: float = 30.0  # how long RUNNING may take to come back after COMMIT
    # Wire efficiency (each offered in the hello only when asked for; docs/protocol.md).
    compress: str | None = None  # zstd, lz4 or auto (compress only when the link is the limit)
    xbzrle: bool = False  # a page sent again goes as a delta against its previous copy
    xbzrle_cache: int = 64 << 20  # bytes of previous copies the source keeps
    dedup: bool = False  # a page whose content was already sent goes as a reference
    streams: int = 1  # page channels (multifd)
    switchover_timeout_s: float | None = None  # pause to READY; None: derived, see below
    # Hot-page prediction (pre-copy): pages dirtied in hold_hot_k of the last hold_hot_n live
    # rounds are not re-sent live but held for the final round (migration/hotpages.py).
    hold_hot: bool = False
    hold_hot_k: int = 2
    hold_hot_n: int = 3
    # Live rounds leave out pages dirtied again before they reach them; the next round
    # sends them (migration/redirtied.py).
    skip_redirtied: bool = True
    # Hybrid: switch to post-copy after this many pre-copy rounds (None: when pre-copy would
    # stop, whatever the reason, or on `migrate-start-postcopy`).
    postcopy_after: int | None = None
    # Soft network handover (migration/netforward.py): frames reaching the old place after
    # the switch-over are forwarded to the new one; off: announce only, as QEMU.
    soft_net: bool = True
    # TLM, when the destination lacks the template: send it first (else migrate generically).
    ship_template: bool = False

    def switchover_limit_s(self) -> float:
        """How long the guest may stay paused before READY: past it the source aborts and
        resumes (before COMMIT only). Ten times the downtime goal, at least 5 s, four times
        that with --verify-memory (the destination hashes all RAM); --switchover-timeout
        overrides."""
        if self.switchover_timeout_s is not None:
            return self.switchover_timeout_s
        limit = max(5.0, 10 * self.max_downtime_ms / 1000)
        return limit * 4 if self.verify_memory else limit


def parse_rate(text: str) -> float:
    """A rate such as `100M`, `1.5G`, `64MiB/s` in bytes per second (binary units: 1G = 2^30
    bytes/s); the one parser is `livemig.units.parse_rate`."""
    return _parse_rate(text)
