"""Pre-copy: rounds while the guest runs (every page, then what was dirtied meanwhile) until
the convergence policy says stop; then the last dirty pages with the guest paused."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from livemig.migration.convergence import Convergence
from livemig.migration.strategies.base import Strategy

if TYPE_CHECKING:
    from livemig.migration.source import Source


class PreCopy(Strategy):
    name = "precopy"

    def __init__(self) -> None:
        self.dirty_mask: np.ndarray | None = None
        self.rounds = 0

    def live_copy(self, src: Source) -> None:
        conv = Convergence(src.opts)
        src.m.memory.start_dirty_log()
        idx: np.ndarray | None = None
        while True:
            self.rounds += 1
            t = time.monotonic()
            rs = src.send_round(self.rounds, idx)
            src.live_time += time.monotonic() - t
            src.live_bytes += rs.bytes_sent
            self.dirty_mask = src.m.memory.fetch_dirty()
            dirty = np.flatnonzero(self.dirty_mask)
            rs.dirty_pages = len(dirty)
            src.stats.dirty_rate = len(dirty) / max(rs.duration_ms / 1000, 1e-6)
            bw = src.live_bytes / src.live_time if src.live_time else 0.0
            d = conv.after_round(self.rounds, sum(rs.pages.values()), len(dirty), bw)
            src.set_throttle(d.throttle)
            if d.stop:
                src.stats.stop_reason = d.reason
                return
            idx = dirty

    def final_pages(self, src: Source) -> np.ndarray | None:
        assert self.dirty_mask is not None
        # Pages dirtied during the last live round and since: a mask OR, not a sorted union.
        final = np.flatnonzero(self.dirty_mask | src.m.memory.fetch_dirty())
        src.m.memory.stop_dirty_log()
        src.step("dirty-bitmap")
        return final
