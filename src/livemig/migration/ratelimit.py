"""The bandwidth cap of a migration's page stream (`--max-bandwidth`)."""

from __future__ import annotations

import time
from collections.abc import Callable

# The longest sleep between two looks at `wake`: at a low cap one batch can be owed seconds of
# sleep, and a broken link, a cancel or the destination's COMPLETE must not wait for it.
SLICE = 0.05


class RateLimiter:
    """Sleeps as needed so that bytes reported through `spent` stay under `rate` bytes/s."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._start = time.monotonic()
        self._bytes = 0

    def spent(self, nbytes: int, wake: Callable[[], bool] | None = None) -> None:
        """Count `nbytes` sent and sleep until they fit under the cap. `wake` is asked at least
        every SLICE s while it sleeps: True ends the sleep early, and what it raises (a broken
        link, a cancel) comes out of here at once."""
        if not self.rate:
            return
        self._bytes += nbytes
        ahead = self._bytes / self.rate - (time.monotonic() - self._start)
        if ahead < -0.5:  # idle for a while: do not let a burst make up for it
            self._start = time.monotonic()
            self._bytes = 0
        while ahead > 0:
            time.sleep(ahead if wake is None else min(ahead, SLICE))
            if wake is not None and wake():
                return
            ahead = self._bytes / self.rate - (time.monotonic() - self._start)
