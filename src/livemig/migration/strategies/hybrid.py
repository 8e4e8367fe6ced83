"""Hybrid ("soft migration", seed 004): pre-copy rounds while the guest runs, then post-copy
for whatever is still owed, instead of a long final round with the guest paused.

The switch comes after `--postcopy-after N` rounds, on `migrate-start-postcopy`, or by itself
when pre-copy cannot finish within `--max-downtime` (rounds stop shrinking, or the round limit
is reached with the predicted downtime still too long). When pre-copy converges on its own
it finishes as pre-copy does: a short final round, nothing left to fetch after COMMIT.

Before it pauses for the switch, the source tells the destination which pages will be owed
(PREPARE, feature `postcopy-prepare`) and waits for PREPARED: by then the destination has
placed every page of the live rounds and unmapped the owed ones (postcopy_ahead.py), work
that would otherwise be done with the guest paused. Pages dirtied while it does so are named
in a further PREPARE, until few are new; whatever is dirtied after the last one is owed all
the same (STATE names every owed page), it only costs the destination an unmap at STATE.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from livemig.migration import hello, records
from livemig.migration.errors import ConnectionLost
from livemig.migration.pageserver import pack_bitmap
from livemig.migration.strategies.postcopy import PostcopyTail
from livemig.migration.strategies.precopy import PreCopy
from livemig.migration.wire import RecordType

if TYPE_CHECKING:
    from livemig.migration.source import Source

PREPARE_WAIT = 30.0  # seconds the destination may take to answer PREPARE (guest running)
PREPARE_PASSES = 2  # PREPAREs at most before the pause (each wait lets the guest dirty more)
PREPARE_ENOUGH = 256  # pages newly dirtied during a PREPARE below which no other is sent
CHECK_EVERY = 0.05  # seconds between cancel checks while PREPARED is awaited


class Hybrid(PostcopyTail, PreCopy):
    name = "hybrid"
    postcopy = True

    def __init__(self) -> None:
        PreCopy.__init__(self)
        PostcopyTail.__init__(self)

    def live_copy(self, src: Source) -> None:
        PreCopy.live_copy(self, src)
        if self._switching(src) and src.session is not None and (
                hello.FEATURE_PREPARE in src.session.features):
            self._prepare(src)

    @staticmethod
    def _switching(src: Source) -> bool:
        """Live copy ended for the switch to post-copy (not converged into pre-copy's end)."""
        return src.stats.stop_reason != "converged"

    def keep_going(self, src: Source, reason: str) -> bool:
        """`--postcopy-after N` asks for N rounds: only convergence (a final round that fits
        --max-downtime) or the round limit ends them sooner."""
        after = src.opts.postcopy_after
        return after is not None and self.rounds < after and reason not in (
            "converged", "max-rounds")

    def switch_now(self, src: Source) -> str | None:
        if src.start_postcopy.is_set():
            return "start-postcopy"
        after = src.opts.postcopy_after
        if after is not None and self.rounds >= after:
            return "postcopy-after"
        return None

    def _prepare(self, src: Source) -> None:
        """PREPARE the pages owed so far, and those dirtied meanwhile, guest still running."""
        assert self.dirty_mask is not None
        named = np.zeros_like(self.dirty_mask)
        fresh = self.dirty_mask
        for _ in range(PREPARE_PASSES):
            src.send(RecordType.PREPARE, records.pack({"round": self.rounds,
                                                       "owed": pack_bitmap(fresh)}))
            named |= fresh
            self._await_prepared(src)
            self.dirty_mask |= src.m.memory.fetch_dirty()
            fresh = self.dirty_mask & ~named
            if np.count_nonzero(fresh) < PREPARE_ENOUGH:
                break
        src.stats.event(f"prepared:{int(np.count_nonzero(named))}")

    @staticmethod
    def _await_prepared(src: Source) -> None:
        assert src.ret is not None
        deadline = time.monotonic() + PREPARE_WAIT
        while True:
            src.check()  # a cancel, or the destination's failure
            try:
                src.ret.expect(RecordType.PREPARED, min(deadline, time.monotonic() + CHECK_EVERY))
                return
            except ConnectionLost:
                src.check()
                if time.monotonic() >= deadline:
                    raise

    def final_pages(self, src: Source) -> np.ndarray | None:
        if not self._switching(src):
            return PreCopy.final_pages(self, src)  # a final round within --max-downtime
        return PostcopyTail.final_pages(self, src)

    def owed_pages(self, src: Source) -> np.ndarray | None:
        return PostcopyTail.owed_pages(self, src) if self._switching(src) else None

    def find_owed(self, src: Source) -> np.ndarray:
        return self.final_mask(src)  # dirty logging stops after COMMIT, not while paused

    def after_commit(self, src: Source) -> None:
        PostcopyTail.after_commit(self, src)
        if self.owed is not None:
            src.m.memory.stop_dirty_log()
