"""The bandwidth cap of a migration's page stream (`--max-bandwidth`)."""

from __future__ import annotations

import time


class RateLimiter:
    """Sleeps as needed so that bytes reported through `spent` stay under `rate` bytes/s."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._start = time.monotonic()
        self._bytes = 0

    def spent(self, nbytes: int) -> None:
        if not self.rate:
            return
        self._bytes += nbytes
        ahead = self._bytes / self.rate - (time.monotonic() - self._start)
        if ahead > 0:
            time.sleep(ahead)
        elif ahead < -0.5:  # idle for a while: do not let a burst make up for it
            self._start = time.monotonic()
            self._bytes = 0
