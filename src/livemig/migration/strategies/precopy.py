"""Pre-copy: rounds while the guest runs (every page, then what was dirtied meanwhile) until
the convergence policy says stop; then the last dirty pages with the guest paused.

With `--hold-hot` (hotpages.py) pages dirtied in k of the last n rounds are predicted hot and
held: the live rounds skip them, and the final round sends them with everything else owed.
A held page stays owed until it is sent, so nothing is lost whatever the prediction says:
the final round is every page owed (held or dirty) plus what was dirtied since."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from livemig.migration.convergence import Convergence
from livemig.migration.hotpages import HoldHot
from livemig.migration.redirtied import RedirtiedSkip
from livemig.migration.strategies.base import Strategy

if TYPE_CHECKING:
    from livemig.migration.source import Source


class PreCopy(Strategy):
    name = "precopy"

    def __init__(self) -> None:
        self.dirty_mask: np.ndarray | None = None  # pages owed after the last live round
        self.hold: HoldHot | None = None
        self.rounds = 0

    def live_copy(self, src: Source) -> None:
        conv = Convergence(src.opts)
        src.m.memory.start_dirty_log()
        if src.opts.hold_hot:
            self.hold = HoldHot(src.m.memory.size // src.m.memory.page_size,
                                src.opts.hold_hot_k, src.opts.hold_hot_n)
        skip = (RedirtiedSkip(src.m.memory, len(src.ram)) if src.opts.skip_redirtied
                else None)
        idx = self.first_round(src)
        held = 0  # pages owed but held back from the round about to be sent
        while True:
            self.rounds += 1
            t = time.monotonic()
            if skip is not None:
                skip.begin_round()
            rs = src.send_round(self.rounds, idx, skip.keep if skip is not None else None)
            rs.held_pages = held
            src.live_time += time.monotonic() - t
            src.live_bytes += rs.bytes_sent
            sent = sum(rs.pages.values())
            src.live_pages += sent
            dirty_mask = src.m.memory.fetch_dirty()
            if skip is not None:  # the skipped pages are owed still: the next round sends them
                dirty_mask |= skip.take()
                rs.skipped_pages = skip.skipped
                sent += skip.skipped  # what the round began with, for the policy
            rs.dirty_pages = int(np.count_nonzero(dirty_mask))
            src.stats.dirty_rate = rs.dirty_pages / max(rs.duration_ms / 1000, 1e-6)
            if self.hold is None:
                live = self.dirty_mask = dirty_mask
                held = 0
            else:
                live = self.hold.after_round(dirty_mask)
                self.dirty_mask = live | self.hold.held
                held = self.hold.held_count
            owed = rs.dirty_pages if self.hold is None else int(np.count_nonzero(self.dirty_mask))
            d = conv.after_round(self.rounds, sent, owed, src.page_bandwidth(), held)
            src.set_throttle(d.throttle)
            switch = self.switch_now(src)
            if (d.stop and not self.keep_going(src, d.reason)) or switch:
                src.stats.stop_reason = switch or d.reason
                return
            if self.hold is not None and held and not live.any():
                # Everything owed is held and auto-converge goes on (without it the policy
                # stops here): send them live, as plain pre-copy would, for the throttle to act.
                live = self.hold.release()
                conv.held = held = 0
            idx = np.flatnonzero(live)

    def first_round(self, src: Source) -> np.ndarray | None:
        """The pages of round 1, with dirty logging already on (None: every non-zero page)."""
        return None

    def keep_going(self, src: Source, reason: str) -> bool:
        """Whether to go on iterating although convergence says stop for `reason`."""
        return False

    def switch_now(self, src: Source) -> str | None:
        """Why live copy must end now whatever convergence says (hybrid's switch), or None."""
        return None

    def final_pages(self, src: Source) -> np.ndarray | None:
        final = np.flatnonzero(self.final_mask(src))
        src.m.memory.stop_dirty_log()
        src.step("dirty-bitmap")
        return final

    def final_mask(self, src: Source) -> np.ndarray:
        """With the guest paused: every page owed (bool per page), dirty logging left on."""
        assert self.dirty_mask is not None
        # Pages owed after the last live round (held ones included) and dirtied since: a mask
        # OR, not a sorted union.
        final = self.dirty_mask | src.m.memory.fetch_dirty()
        if self.hold is not None:
            src.stats.event(f"hold-hot-final:{self.hold.held_count}")
        return final
