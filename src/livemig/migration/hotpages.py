"""Hot-page prediction for pre-copy (`--hold-hot`): which dirty pages to hold for the final round.

A page that was dirtied in most of the recent live rounds will very likely be dirtied again
before the guest pauses, so sending it in a live round is wasted: it goes again in the final
round anyway. This is the time-series prediction of Hu et al. (2011, "A time-series based
pre-copy approach"): a page dirtied in at least `k` of the last `n` rounds is predicted hot. With
k = n = 1 it is the plain recency (LRU working-set) prediction of Zaw and Thein (2012).

`DirtyHistory` keeps, per page, the last `n` rounds as the low bits of one byte (bit 0 = the
latest round); updating it and counting bits are whole-array numpy operations, never a loop over
pages. `HoldHot` adds what pre-copy needs: the set of pages held back so far, which stays owed
to the destination until it is sent (in a later live round once the page cools down, else in
the final round, where every held page goes whatever happens).
"""

from __future__ import annotations

import numpy as np

MAX_HISTORY = 8  # rounds a page's history can hold (bits of a uint8)

# Set bits in each byte value, to count a whole history array with one take.
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint8)


def check_k_n(k: int, n: int) -> None:
    """ValueError unless 1 <= k <= n <= MAX_HISTORY."""
    if not 1 <= k <= n <= MAX_HISTORY:
        raise ValueError(f"hold-hot needs 1 <= k <= n <= {MAX_HISTORY} (got k={k}, n={n})")


class DirtyHistory:
    """For each of `npages` pages, whether it was dirtied in each of the last `n` rounds."""

    def __init__(self, npages: int, k: int = 2, n: int = 3) -> None:
        check_k_n(k, n)
        self.k, self.n = k, n
        self.bits = np.zeros(npages, dtype=np.uint8)
        self._mask = np.uint8((1 << n) - 1)
        self.rounds = 0

    def observe(self, dirty: np.ndarray) -> None:
        """Record one round: `dirty` is a bool per page (dirtied during that round)."""
        if dirty.shape != self.bits.shape:
            raise ValueError(f"dirty mask of {dirty.shape} for {self.bits.shape} pages")
        np.left_shift(self.bits, 1, out=self.bits)
        np.bitwise_or(self.bits, np.asarray(dirty, dtype=bool).view(np.uint8), out=self.bits)
        np.bitwise_and(self.bits, self._mask, out=self.bits)
        self.rounds += 1

    def counts(self) -> np.ndarray:
        """Rounds out of the last `n` in which each page was dirtied (uint8 per page)."""
        return _POPCOUNT[self.bits]

    def hot(self) -> np.ndarray:
        """Bool per page: dirtied in at least `k` of the last `n` rounds."""
        return self.counts() >= self.k


class HoldHot:
    """Splits the pages owed after each live round into those sent live in the next round and
    those held (predicted hot) for the final round."""

    def __init__(self, npages: int, k: int = 2, n: int = 3) -> None:
        self.history = DirtyHistory(npages, k, n)
        self.held = np.zeros(npages, dtype=bool)  # owed to the destination, not sent yet

    @property
    def held_count(self) -> int:
        return int(np.count_nonzero(self.held))

    def after_round(self, dirty: np.ndarray) -> np.ndarray:
        """Record the pages dirtied during the round just sent; return the bool mask of pages
        the next live round sends. Every page owed (dirtied now, or held before) is either in
        that mask or in `held`."""
        self.history.observe(dirty)
        owed = dirty | self.held
        hot = self.history.hot()
        self.held = owed & hot
        return owed & ~hot

    def release(self) -> np.ndarray:
        """Stop holding: the pages held so far, as a bool mask (now owed by the caller)."""
        out, self.held = self.held, np.zeros_like(self.held)
        return out
