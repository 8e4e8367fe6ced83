"""What the user asks of a migration."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Mode(enum.Enum):
    """Migration strategy."""

    STOP_COPY = "stop-copy"
    PRECOPY = "precopy"


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
    commit_timeout_s: float = 30.0


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1024, "mi": 1 << 20, "gi": 1 << 30}


def parse_rate(text: str) -> float:
    """Parse a rate such as `100M`, `1.5G`, `64Mi`, `200MB/s` into bytes per second."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?)?b?(/s)?\s*", text.lower())
    if not m:
        raise ValueError(f"cannot read rate {text!r} (try 100M, 1G, 64Mi)")
    value = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if value <= 0:
        raise ValueError(f"rate must be positive, got {text!r}")
    return value
