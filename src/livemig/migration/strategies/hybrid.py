"""Hybrid ("soft migration", seed 004): pre-copy rounds while the guest runs, then post-copy
for whatever is still owed, instead of a long final round with the guest paused.

The switch comes after `--postcopy-after N` rounds, on `migrate-start-postcopy`, or when
pre-copy's convergence policy would stop (converged, not shrinking, max rounds): then the
pages owed (sent-then-dirtied and never sent) go to the destination after COMMIT.
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
        mask = np.zeros(src.m.memory.size // src.m.memory.page_size, dtype=bool)
        mask[owed] = True
        return self.begin(src, mask)
