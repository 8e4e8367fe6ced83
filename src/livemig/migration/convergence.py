"""Pre-copy's convergence policy: when to stop iterating, and auto-converge's throttle.

After each live round the source knows how many pages the round sent, how many were dirtied
meanwhile, and the bandwidth it achieved. It stops iterating when

- the dirty pages would go in `max_downtime` at that bandwidth ("converged"), or
- the round reached `max_rounds` ("max-rounds"), or
- without auto-converge, the round did not shrink: it left at least `shrink_ratio` as many
  dirty pages as it sent ("not-converging").

With auto-converge, a round that does not shrink raises the vCPU throttle instead: to
`throttle_initial` (20 %) the first time, then by `throttle_increment` (10 %) per such round,
up to `throttle_max`.
"""

from __future__ import annotations

from dataclasses import dataclass

from livemig.contract import PAGE_SIZE
from livemig.migration.options import MigrationOptions

# Per-page cost on the wire besides the page itself (PAGES tables, headers), for predictions.
PAGE_OVERHEAD = 13


@dataclass
class Decision:
    """What to do after a round."""

    stop: bool
    reason: str
    predicted_downtime_ms: float
    throttle: float


class Convergence:
    """Stateful policy; call `after_round` once per live round."""

    def __init__(self, opts: MigrationOptions) -> None:
        self.opts = opts
        self.throttle = 0.0

    def predict_ms(self, dirty_pages: int, bandwidth: float) -> float:
        """Time to send `dirty_pages` at `bandwidth` bytes/s."""
        if dirty_pages == 0:
            return 0.0
        if bandwidth <= 0:
            return float("inf")
        return dirty_pages * (PAGE_SIZE + PAGE_OVERHEAD) / bandwidth * 1000

    def after_round(self, number: int, sent: int, dirty: int, bandwidth: float) -> Decision:
        """Decide after round `number` which sent `sent` pages while `dirty` were dirtied."""
        o = self.opts
        predicted = self.predict_ms(dirty, bandwidth)
        if predicted <= o.max_downtime_ms:
            return Decision(True, "converged", predicted, self.throttle)
        if number >= o.max_rounds:
            return Decision(True, "max-rounds", predicted, self.throttle)
        shrinking = dirty < sent * o.shrink_ratio
        if shrinking:
            return Decision(False, "shrinking", predicted, self.throttle)
        if not o.auto_converge:
            return Decision(True, "not-converging", predicted, self.throttle)
        if self.throttle == 0.0:
            self.throttle = o.throttle_initial
        else:
            self.throttle = min(o.throttle_max, self.throttle + o.throttle_increment)
        return Decision(False, "throttling", predicted, self.throttle)
