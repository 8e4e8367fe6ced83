"""Hybrid ("soft migration", seed 004): pre-copy rounds while the guest runs, then post-copy
for whatever is still owed, instead of a long final round with the guest paused.

The switch comes after `--postcopy-after N` rounds, on `migrate-start-postcopy`, or by itself
when pre-copy cannot finish within `--max-downtime` (rounds stop shrinking, or the round limit
is reached with the predicted downtime still too long). When pre-copy converges on its own
it finishes as pre-copy does: a short final round, nothing left to fetch after COMMIT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from livemig.migration.strategies.postcopy import PostcopyTail
from livemig.migration.strategies.precopy import PreCopy

if TYPE_CHECKING:
    from livemig.migration.source import Source


class Hybrid(PostcopyTail, PreCopy):
    name = "hybrid"
    postcopy = True

    def __init__(self) -> None:
        PreCopy.__init__(self)
        PostcopyTail.__init__(self)

    def switch_now(self, src: Source) -> str | None:
        if src.start_postcopy.is_set():
            return "start-postcopy"
        after = src.opts.postcopy_after
        if after is not None and self.rounds >= after:
            return "postcopy-after"
        return None

    def final_pages(self, src: Source) -> np.ndarray | None:
        owed = PreCopy.final_pages(self, src)
        assert owed is not None
        if src.stats.stop_reason == "converged":
            return owed  # a final round within --max-downtime: no post-copy needed
        mask = np.zeros(src.m.memory.size // src.m.memory.page_size, dtype=bool)
        mask[owed] = True
        return self.begin(src, mask)
