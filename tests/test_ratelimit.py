"""--max-bandwidth's limiter: its sleep ends early when the migration no longer needs it."""

from __future__ import annotations

import pytest

from livemig.migration.errors import ConnectionLost
from livemig.migration.ratelimit import SLICE, RateLimiter


def test_a_broken_link_ends_the_sleep_at_once() -> None:
    lim = RateLimiter(1.0)  # one byte a second: 1000 bytes owe 1000 s of sleep
    calls = []

    def wake() -> bool:
        calls.append(1)
        raise ConnectionLost("the link broke")

    with pytest.raises(ConnectionLost):
        lim.spent(1000, wake)
    assert calls == [1]  # asked after the first slice, not after the whole debt


def test_wake_true_ends_the_sleep_and_false_lets_it_go_on() -> None:
    lim = RateLimiter(1.0)
    lim.spent(1000, lambda: True)
    answers = iter([False, False, True])
    asked = []

    def wake() -> bool:
        asked.append(1)
        return next(answers)

    lim.spent(1000, wake)
    assert len(asked) == 3


def test_no_cap_never_sleeps_or_asks() -> None:
    def wake() -> bool:
        raise AssertionError("asked without a cap")

    RateLimiter(None).spent(1 << 30, wake)
    assert SLICE <= 0.1  # a cancel or a cut is seen within a tenth of a second
