"""`ping` (iputils) run from a namespace at a fixed interval, and what it reports."""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass

_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) received")
_RTT = re.compile(r"= [\d.]+/[\d.]+/([\d.]+)/")


@dataclass
class PingResult:
    """Echo requests sent and answered, and the largest round-trip time seen."""

    sent: int
    received: int
    max_rtt_ms: float | None

    @property
    def lost(self) -> int:
        return self.sent - self.received

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"lost": self.lost}


def parse(text: str) -> PingResult:
    """The summary lines of iputils ping; ValueError if there are none."""
    m = _COUNTS.search(text)
    if m is None:
        raise ValueError(f"no ping summary in: {text.strip()[-200:]!r}")
    rtt = _RTT.search(text)
    return PingResult(int(m.group(1)), int(m.group(2)),
                      float(rtt.group(1)) if rtt else None)


WAIT_S = 5  # at the end, how long ping waits for replies (at least; -W)


def start(prefix: list[str], host: str, count: int, interval: float) -> subprocess.Popen[str]:
    """Start `ping -q -i INTERVAL -c COUNT -W WAIT_S HOST` under `prefix` (e.g. `ip netns exec
    NS`). Lost is what ping counts: replies that had not come when it ended."""
    return subprocess.Popen([*prefix, "ping", "-q", "-i", str(interval), "-c", str(count),
                             "-W", str(WAIT_S), host], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], timeout: float) -> PingResult:
    out, _ = proc.communicate(timeout=timeout)
    return parse(out)
