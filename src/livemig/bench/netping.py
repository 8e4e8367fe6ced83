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


WAIT_S = 10  # after the last request, how long replies are still awaited


def start(prefix: list[str], host: str, count: int, interval: float) -> subprocess.Popen[str]:
    """Start `ping -q -i INTERVAL -c COUNT HOST` under `prefix` (e.g. `ip netns exec NS`);
    it waits for every reply until WAIT_S after the last request is due (-w), so that a reply
    counts as lost only when it never came, not when it came late."""
    deadline = int(count * interval) + WAIT_S
    return subprocess.Popen([*prefix, "ping", "-q", "-i", str(interval), "-c", str(count),
                             "-w", str(deadline), host], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], timeout: float) -> PingResult:
    out, _ = proc.communicate(timeout=timeout)
    return parse(out)
