"""Pre-copy's convergence policy: when to stop iterating, and auto-converge's throttle.

After each live round the source knows how many pages the round sent, how many were dirtied
meanwhile, and the bandwidth it achieved (counted in pages, as if each went raw: see
`Source.page_bandwidth`). It stops iterating when

- the pages owed (dirty, and held: see below) would go in `max_downtime` at that bandwidth
  and another live round would not cut them much ("converged"). The next round's size is
  predicted from the measured dirty rate: a round that sends S pages at B pages/s lasts S/B,
  and a guest dirtying r pages/s leaves r·S/B pages for the round after it, so each round
  scales what is owed by q = r/B, which is this round's owed/sent. While q ≤
  `CONTINUE_RATIO`, more than `MIN_FINAL_PAGES` are owed and they would take more than
  `FINAL_FRACTION` of the limit (10 ms of the default 300 ms), one more short live round
  shrinks the final round (the downtime) by 30 % or more for a fraction of the time of the
  previous round, so the source goes on even though the downtime limit is already met (after
  the first round always, whose counts say nothing yet of the dirty rate: see below). A round
  that did not shrink that much, with the predicted downtime still over `RETRY_FRACTION` of
  the limit (30 ms of 300), gets one more round, once per migration ("retry"): on a busy host
  one slow round is often a stall of the sender, not the guest outrunning the link, and the
  next round is then much smaller; or
- the round reached `max_rounds` ("max-rounds"), or
- without auto-converge, `NOT_CONVERGING_ROUNDS` (2) rounds in a row did not shrink: each left
  at least `shrink_ratio` as many pages owed as there were when it began ("not-converging";
  one such round may be a stall of a sender on a busy host); never after the first round,
  which carries every page holding data and so lasts long enough for a busy guest to dirty
  everything it ever writes.

With `--hold-hot` (hotpages.py) some of the pages owed are held back from the live rounds for
the final one. They are part of every figure here: the predicted downtime is that of all the
pages owed, held ones included (they will be sent with the guest paused), and a round shrinks
when the pages owed after it (live and held) fall below `shrink_ratio` of those owed when it
began (what it sent plus what was held). Without held pages this is the plain rule: the round
left fewer dirty pages than it sent. When every page owed is held, a live round would have
nothing to send: without auto-converge iteration stops there ("only-held"); with it, the
strategy sends the held pages live (releases them) so that the throttle acts on them as in
plain pre-copy, and the policy goes on as usual.

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
# Go on iterating (even within the downtime limit) while a round leaves at most this fraction
# of the pages it began with, more than MIN_FINAL_PAGES (a final round of a millisecond) and a
# predicted downtime over FINAL_FRACTION of the limit (10 ms of the default 300).
CONTINUE_RATIO = 0.7
MIN_FINAL_PAGES = 256
FINAL_FRACTION = 1 / 30
# Without auto-converge, iteration gives up after this many rounds in a row that did not shrink.
NOT_CONVERGING_ROUNDS = 2
# Within the limit, a round that did not shrink enough to go on may have been a stall of the
# sender on a busy host (live rates here vary 2x from one round to the next): while the
# predicted downtime is over this fraction of the limit (30 ms of the default 300), one more
# round is tried, once per migration.
RETRY_FRACTION = 1 / 10


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
        self.held = 0  # pages held back (--hold-hot) when the next round begins
        self.stalled = 0  # rounds in a row that did not shrink
        self.retried = False  # the one extra round within the limit was tried

    def predict_ms(self, dirty_pages: int, bandwidth: float) -> float:
        """Time to send `dirty_pages` at `bandwidth` bytes/s."""
        if dirty_pages == 0:
            return 0.0
        if bandwidth <= 0:
            return float("inf")
        return dirty_pages * (PAGE_SIZE + PAGE_OVERHEAD) / bandwidth * 1000

    def after_round(self, number: int, sent: int, dirty: int, bandwidth: float,
                    held: int = 0) -> Decision:
        """Decide after round `number`, which sent `sent` pages, with `dirty` pages owed after
        it (dirtied meanwhile, plus any still held), `held` of which are held back from the
        next live round (--hold-hot). Everything owed counts for the downtime."""
        o = self.opts
        began = sent + self.held  # owed when the round began: what it sent, what it held
        self.held = held
        predicted = self.predict_ms(dirty, bandwidth)
        only_held = held > 0 and dirty == held  # a live round would have nothing to send
        # The first round carries every page holding data and lasts long enough for a busy
        # guest to dirty all it ever writes: its counts say nothing yet of the dirty rate.
        first = number == 1
        if predicted <= o.max_downtime_ms:
            small = dirty <= MIN_FINAL_PAGES or predicted <= o.max_downtime_ms * FINAL_FRACTION
            more = number < o.max_rounds and not only_held and not small
            if more and (first or dirty <= began * CONTINUE_RATIO):
                return Decision(False, "shrinking", predicted, self.throttle)
            if more and not self.retried and predicted > o.max_downtime_ms * RETRY_FRACTION:
                self.retried = True
                return Decision(False, "retry", predicted, self.throttle)
            return Decision(True, "converged", predicted, self.throttle)
        if number >= o.max_rounds:
            return Decision(True, "max-rounds", predicted, self.throttle)
        if only_held and not o.auto_converge:
            return Decision(True, "only-held", predicted, self.throttle)
        shrinking = first or dirty < began * o.shrink_ratio
        self.stalled = 0 if shrinking else self.stalled + 1
        if shrinking:
            return Decision(False, "shrinking", predicted, self.throttle)
        if not o.auto_converge:
            if self.stalled < NOT_CONVERGING_ROUNDS:
                # one round that grew may be a stall of the sender (a busy host), not the
                # guest outrunning the link: one more round before giving up
                return Decision(False, "not-shrinking", predicted, self.throttle)
            return Decision(True, "not-converging", predicted, self.throttle)
        if self.throttle == 0.0:
            self.throttle = o.throttle_initial
        else:
            self.throttle = min(o.throttle_max, self.throttle + o.throttle_increment)
        return Decision(False, "throttling", predicted, self.throttle)
