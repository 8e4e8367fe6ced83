"""Skipping pages the guest dirties again before a live round reaches them.

A live round sends the pages owed when it began, in page order. A page the guest writes again
before the round gets to it would go twice: now, and in the next round, which owes it anyway.
So while a round runs, the source reads the dirty log every `REFRESH_S` and leaves out the
pages it finds dirty again (the original Xen pre-copy does the same: Clark et al., "Live
Migration of Virtual Machines", NSDI 2005, section 4.4). What the reads find stays owed: it is
merged into the dirty set the round leaves (`take`), so nothing is lost whatever is skipped,
and the next round sends those pages once.

A shorter round leaves fewer pages dirty behind it. For a guest that rewrites its working set
in order (the hotset workload) the first round loses 10-50 % of its pages this way; later
rounds little, as each sends the stretch the guest has just left (docs/protocol.md, pre-copy).
What it costs is a dirty-log read per `REFRESH_S` (0.3-0.6 ms for 1 GiB of guest here).
"""

from __future__ import annotations

import time

import numpy as np

from livemig.contract import GuestMemory

REFRESH_S = 0.008  # dirty-log reads at most this often during a round
WINDOW = 2048  # pages filtered at a time (8 MiB): a read may come before each window


class RedirtiedSkip:
    """Filters a live round's pages against the dirty log read during the round."""

    def __init__(self, memory: GuestMemory, pages: int, refresh_s: float = REFRESH_S) -> None:
        self.memory = memory
        self.refresh_s = refresh_s
        self.found = np.zeros(pages, dtype=bool)  # dirtied since the last round ended
        self.skipped = 0  # pages left out of the current round
        self._last = time.monotonic()

    def begin_round(self) -> None:
        """A round starts right after the dirty log was read: nothing is found yet."""
        self.skipped = 0
        self._last = time.monotonic()

    def keep(self, idx: np.ndarray) -> np.ndarray:
        """The pages of `idx` (about to be sent) not dirtied again since the round began."""
        now = time.monotonic()
        if now - self._last >= self.refresh_s:
            self.found |= self.memory.fetch_dirty()
            self._last = time.monotonic()
        if not self.found.any():
            return idx
        kept = idx[~self.found[idx]]
        self.skipped += len(idx) - len(kept)
        return kept

    def take(self) -> np.ndarray:
        """Every page found dirty during the round (bool per page); cleared for the next."""
        found = self.found
        self.found = np.zeros_like(found)
        return found
