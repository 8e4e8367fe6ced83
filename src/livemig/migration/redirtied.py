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
A read costs 0.3-0.6 ms for 1 GiB of guest here (and the guest a write fault on each page it
writes again), so reads that skip little come less and less often: with a dense guest that
writes a small hot loop (nothing to gain) reading every 8 ms made migrations ~10 % slower.
"""

from __future__ import annotations

import time

import numpy as np

from livemig.contract import GuestMemory

REFRESH_S = 0.008  # dirty-log reads at most this often during a round
MAX_REFRESH_S = 0.256  # ... and at least this often, after reads that found little
# A read costs about what sending this many pages does (0.5 ms); one whose findings skipped
# fewer pages doubles the time to the next read, one that skipped more brings it back.
MIN_YIELD = 128
WINDOW = 2048  # pages filtered at a time (8 MiB): a read may come before each window


class RedirtiedSkip:
    """Filters a live round's pages against the dirty log read during the round."""

    def __init__(self, memory: GuestMemory, pages: int, refresh_s: float = REFRESH_S) -> None:
        self.memory = memory
        self.refresh_s = refresh_s
        self.found = np.zeros(pages, dtype=bool)  # dirtied since the last round ended
        self.skipped = 0  # pages left out of the current round
        self.reads = 0  # dirty-log reads during the current round
        self._interval = refresh_s
        self._since = 0  # pages skipped since the last read
        self._found_any = False
        self._last = time.monotonic()

    def begin_round(self) -> None:
        """A round starts right after the dirty log was read: nothing is found yet."""
        self.skipped = self.reads = self._since = 0
        self._interval = self.refresh_s
        self._last = time.monotonic()

    def keep(self, idx: np.ndarray) -> np.ndarray:
        """The pages of `idx` (about to be sent) not dirtied again since the round began."""
        if time.monotonic() - self._last >= self._interval:
            self._read()
        if not self._found_any:
            return idx
        kept = idx[~self.found[idx]]
        self.skipped += len(idx) - len(kept)
        self._since += len(idx) - len(kept)
        return kept

    def _read(self) -> None:
        """Read the dirty log; read less often while reads pay for less than they cost (a
        guest writing few pages, or none ahead of the round)."""
        if self.reads and self._since < MIN_YIELD:
            self._interval = min(self._interval * 2, MAX_REFRESH_S)
        else:
            self._interval = self.refresh_s
        self.found |= self.memory.fetch_dirty()
        self._found_any = bool(self.found.any())
        self.reads += 1
        self._since = 0
        self._last = time.monotonic()

    def take(self) -> np.ndarray:
        """Every page found dirty during the round (bool per page); cleared for the next."""
        found = self.found
        self.found = np.zeros_like(found)
        self._found_any = False
        return found
