"""Hot-page prediction (`--hold-hot`): the per-page bit history, the honest convergence policy,
engine migrations with a skewed writer, and a KVM migration of the skewed hotset guest."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import KEY_FILE, Listener, MachineProcess, image, needs_kvm, run_cli, wait_for
from test_migrate_engine import Dest, Guest, connect, source

from livemig.contract import PAGE_SIZE
from livemig.control import ControlError
from livemig.migration import MigrationOptions, migrate
from livemig.migration.convergence import PAGE_OVERHEAD, Convergence
from livemig.migration.hotpages import DirtyHistory, HoldHot
from livemig.migration.stats import MigrationStats

# -- the bit history ---------------------------------------------------------------------------


def mask(n: int, *pages: int) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[list(pages)] = True
    return m


def test_k_of_n_rounds_make_a_page_hot() -> None:
    h = DirtyHistory(6, k=2, n=3)
    h.observe(mask(6, 0, 1, 2))
    assert not h.hot().any()  # one round is not enough for k=2
    h.observe(mask(6, 0, 1, 3))
    assert h.hot().tolist() == [True, True, False, False, False, False]
    h.observe(mask(6, 0, 2))
    # page 2: rounds 1 and 3 of the last 3; page 1: rounds 1 and 2; page 3: once
    assert h.hot().tolist() == [True, True, True, False, False, False]
    assert h.counts().tolist() == [3, 2, 2, 1, 0, 0]
    h.observe(mask(6, 0))
    # round 1 falls out of the window: page 1 (rounds 1, 2) and page 2 (rounds 1, 3) cool down
    assert h.counts().tolist() == [3, 1, 1, 1, 0, 0]
    assert h.hot().tolist() == [True, False, False, False, False, False]


def test_history_matches_a_sliding_window_sum() -> None:
    rng = np.random.default_rng(7)
    pages, rounds = 5000, 12
    for k, n in [(1, 1), (2, 3), (3, 3), (2, 5), (4, 8)]:
        h = DirtyHistory(pages, k, n)
        seen = rng.random((rounds, pages)) < rng.random(pages)  # each page its own rate
        for r in range(rounds):
            h.observe(seen[r])
            want = seen[max(0, r + 1 - n): r + 1].sum(axis=0)
            assert np.array_equal(h.counts(), want), (k, n, r)
            assert np.array_equal(h.hot(), want >= k)


@pytest.mark.parametrize("k,n", [(0, 3), (3, 2), (2, 9), (1, 0)])
def test_bad_k_n_is_refused(k: int, n: int) -> None:
    with pytest.raises(ValueError, match="hold-hot"):
        DirtyHistory(10, k, n)


def test_history_of_a_big_guest_is_cheap() -> None:
    h = DirtyHistory(1 << 20, 2, 3)  # 4 GiB of pages
    dirty = np.zeros(1 << 20, dtype=bool)
    dirty[::7] = True
    t = time.perf_counter()
    for _ in range(10):
        h.observe(dirty)
        hot = h.hot()
    assert time.perf_counter() - t < 2.0  # whole-array numpy, no loop over pages
    assert hot.sum() == dirty.sum()


def test_held_pages_stay_owed_until_sent() -> None:
    hh = HoldHot(8, k=2, n=3)
    live = hh.after_round(mask(8, 0, 1, 5))
    assert live.tolist() == mask(8, 0, 1, 5).tolist() and hh.held_count == 0
    live = hh.after_round(mask(8, 0, 1, 6))
    assert np.flatnonzero(live).tolist() == [6] and np.flatnonzero(hh.held).tolist() == [0, 1]
    live = hh.after_round(mask(8, 0))  # page 1 not dirtied again: still hot (2 of 3), still held
    assert not live.any() and np.flatnonzero(hh.held).tolist() == [0, 1]
    live = hh.after_round(mask(8, 0))  # now page 1 cools down and goes live, though not dirty
    assert np.flatnonzero(live).tolist() == [1] and np.flatnonzero(hh.held).tolist() == [0]
    released = hh.release()
    assert np.flatnonzero(released).tolist() == [0] and hh.held_count == 0


# -- the convergence policy counts held pages -------------------------------------------------

ONE_PAGE_PER_MS = (PAGE_SIZE + PAGE_OVERHEAD) * 1000.0  # bytes/s at which a page takes 1 ms


def test_predicted_downtime_includes_held_pages() -> None:
    conv = Convergence(MigrationOptions(max_downtime_ms=10))
    d = conv.after_round(1, 1000, 50, ONE_PAGE_PER_MS)
    assert not d.stop and d.predicted_downtime_ms == pytest.approx(50)
    # 4 pages dirty and live, 30 held: 34 pages go paused, not 4
    d = conv.after_round(2, 50, 34, ONE_PAGE_PER_MS, held=30)
    assert not d.stop and d.reason == "shrinking"
    assert d.predicted_downtime_ms == pytest.approx(34)
    # round 3 sent the 4; owed 8 (held shrank to 5 as pages cooled): 8 ms fits
    d = conv.after_round(3, 4, 8, ONE_PAGE_PER_MS, held=5)
    assert d.stop and d.reason == "converged" and d.predicted_downtime_ms == pytest.approx(8)


def test_a_round_shrinks_against_what_was_owed_when_it_began() -> None:
    conv = Convergence(MigrationOptions(max_downtime_ms=1))
    conv.after_round(1, 1000, 140, ONE_PAGE_PER_MS)
    conv.after_round(2, 140, 120, ONE_PAGE_PER_MS, held=100)
    # round 3 sent 20 with 100 held: 120 were owed; 110 left is less than 95 % of 120
    d = conv.after_round(3, 20, 110, ONE_PAGE_PER_MS, held=100)
    assert not d.stop and d.reason == "shrinking"
    # round 4 sent 10 with 100 held: 110 owed; 108 left is not shrinking: once is not enough
    d = conv.after_round(4, 10, 108, ONE_PAGE_PER_MS, held=100)
    assert not d.stop and d.reason == "not-shrinking"
    d = conv.after_round(5, 8, 107, ONE_PAGE_PER_MS, held=100)  # twice in a row: give up
    assert d.stop and d.reason == "not-converging"


def test_nothing_left_but_held_pages_stops_iterating() -> None:
    conv = Convergence(MigrationOptions(max_downtime_ms=1))
    conv.after_round(1, 1000, 140, ONE_PAGE_PER_MS)
    d = conv.after_round(2, 140, 100, ONE_PAGE_PER_MS, held=100)
    assert d.stop and d.reason == "only-held" and d.predicted_downtime_ms == pytest.approx(100)
    conv = Convergence(MigrationOptions(max_downtime_ms=1, auto_converge=True))
    conv.after_round(1, 1000, 140, ONE_PAGE_PER_MS)
    d = conv.after_round(2, 140, 100, ONE_PAGE_PER_MS, held=100)
    assert not d.stop  # auto-converge goes on (the strategy releases the held pages)


def test_control_request_carries_hold_hot() -> None:
    from livemig.cli.migration_control import options_from_request

    opts = options_from_request({"hold_hot": True, "hold_hot_k": 1, "hold_hot_n": 4})
    assert opts.hold_hot and (opts.hold_hot_k, opts.hold_hot_n) == (1, 4)
    assert not options_from_request({}).hold_hot
    with pytest.raises(ControlError, match="hold-hot"):
        options_from_request({"hold_hot": True, "hold_hot_k": 4, "hold_hot_n": 3})


# -- engine migrations with a skewed writer ----------------------------------------------------

HOT = 128  # pages rewritten all the time


def skewed_migration(**opts: Any) -> tuple[MigrationStats, int]:
    """Migrate a 16 MiB MemoryMachine whose first HOT pages are rewritten every 0.5 ms while
    the rest of its non-zero half is written one page at a time, slowly; check the copy."""
    src = source(16 << 20)
    n = len(src.memory.pages)
    hot = Guest(src, np.arange(0, HOT), burst=HOT, pause=0.0005)
    cold = Guest(src, np.arange(HOT, n // 2), burst=1, pause=0.001)
    time.sleep(0.05)
    d = Dest()
    try:
        stats = migrate(src, connect(d.addr), MigrationOptions(verify_memory=True, **opts))
    finally:
        hot.stop.set()
        cold.stop.set()
    d.join()
    assert d.error is None and d.machine is not None
    assert np.array_equal(d.machine.memory.pages, src.memory.pages)
    assert d.machine.counter == src.counter
    assert stats.status == "completed" and stats.verified_memory
    return stats, sum(stats.pages().values())


# A slow link and a downtime goal the hot set can never meet, and rounds that never count as
# "not shrinking": without prediction every round re-sends the hot set until max-rounds.
SKEWED = {"max_bandwidth": 40e6, "max_downtime_ms": 0.01, "max_rounds": 6, "shrink_ratio": 10.0}


def test_hold_hot_sends_fewer_pages_and_the_copy_is_exact() -> None:
    plain, plain_pages = skewed_migration(**SKEWED)
    held, held_pages = skewed_migration(hold_hot=True, **SKEWED)
    assert all(r.held_pages == 0 for r in plain.rounds)
    rounds = held.rounds
    assert max(r.held_pages for r in rounds) >= HOT // 2
    assert rounds[-1].held_pages == 0  # the final round holds nothing back
    events = [e for _, e in held.events]
    assert any(e.startswith("hold-hot-final:") for e in events)
    detail = held.to_json()["round_detail"]
    assert "held_pages" in detail[0]
    assert held_pages < plain_pages, (held_pages, plain_pages)


def test_hold_hot_with_auto_converge_releases_and_completes() -> None:
    # Everything written is hot: live rounds would have nothing to send, so held pages go
    # live again for the throttle to act on them; the copy must still be exact.
    src = source(16 << 20)
    g = Guest(src, np.arange(0, 1024), burst=128)
    d = Dest()
    opts = MigrationOptions(max_bandwidth=32e6, auto_converge=True, max_downtime_ms=50,
                            verify_memory=True, hold_hot=True, hold_hot_k=1, hold_hot_n=1)
    try:
        stats = migrate(src, connect(d.addr), opts)
    finally:
        g.stop.set()
    d.join()
    assert d.error is None and d.machine is not None and stats.status == "completed"
    assert np.array_equal(d.machine.memory.pages, src.memory.pages)
    assert stats.verified_memory and stats.throttle > 0 and len(stats.rounds) > 2
    assert all(r.held_pages == 0 for r in stats.rounds)  # released every time


# -- the skewed hotset guest on KVM ------------------------------------------------------------


@needs_kvm
def test_kvm_skewed_hotset_migrates_with_hold_hot(machines: Callable[..., MachineProcess],
                                                  tmp_path: Path) -> None:
    src = machines(["run", image("hotset"), "--mem", "64M", "--vcpus", "2", "--append",
                    "hot=1M cold=8M coldrate=2000"], "src")
    src.wait_heartbeat_above(5, 30)
    console = src.console.read_text()
    assert "hotset info pages=256 " in console and "cold pages=2048 " in console, console
    dst = Listener(tmp_path, console=tmp_path / "dst.console")
    try:
        res = run_cli("migrate", src.control, "--to", f"127.0.0.1:{dst.port}",
                      "--key-file", KEY_FILE, "--hold-hot", "--verify-memory",
                      "--max-bandwidth", "20M", "--max-downtime", "1", "--json", timeout=120)
        assert res.returncode == 0, res.stderr + res.stdout[-3000:]
        stats = json.loads(res.stdout)
        assert stats["status"] == "completed" and stats["verified_memory"] is True, stats
        # the hot megabyte takes ~50 ms at 20 MiB/s: it never fits 1 ms, so it is held
        assert any(r["held_pages"] > 0 for r in stats["round_detail"]), stats["round_detail"]
        assert src.proc.wait(15) == 0
        first = wait_for(lambda: last_heartbeat(dst), 30, "a heartbeat at the destination")
        wait_for(lambda: last_heartbeat(dst) > first + 3, 30, "heartbeats going on there")
        assert dst.ctl("status")["probe"]["counts"]["fail"] == 0
    finally:
        dst.terminate()


def last_heartbeat(dst: Listener) -> int:
    """The destination machine's last heartbeat value, 0 before it runs."""
    try:
        last = dst.ctl("status")["probe"]["last_heartbeat"]
    except Exception:  # its control socket appears once the machine runs
        return 0
    return 0 if last is None else int(last["value"])


def test_rounds_go_on_within_the_limit_while_they_shrink_fast() -> None:
    """The downtime limit is met, but the next round is predicted (dirty rate over bandwidth:
    dirtied/sent) to leave half as many pages: one more live round, for a smaller final one."""
    conv = Convergence(MigrationOptions(max_downtime_ms=300))
    d = conv.after_round(1, 25600, 25000, ONE_PAGE_PER_MS * 1000)  # first round: never judged
    assert not d.stop and d.reason == "shrinking"
    d = conv.after_round(2, 25000, 12000, ONE_PAGE_PER_MS * 1000)  # 12 ms, q = 0.48
    assert not d.stop and d.reason == "shrinking" and d.predicted_downtime_ms < 300
    d = conv.after_round(3, 12000, 10000, ONE_PAGE_PER_MS * 1000)  # q = 0.83: not worth it
    assert d.stop and d.reason == "converged"
    d = Convergence(MigrationOptions()).after_round(2, 1000, 200, ONE_PAGE_PER_MS * 1000)
    assert d.stop and d.reason == "converged"  # 200 pages: a final round of a millisecond


def test_a_round_that_stalled_within_the_limit_gets_one_more_try() -> None:
    """A round that left nearly what it sent, with a final round still predicted over a tenth
    of the limit, may have been a stall of the sender: one more round, once."""
    conv = Convergence(MigrationOptions(max_downtime_ms=300))
    rate = ONE_PAGE_PER_MS * 250  # 250 pages/ms
    conv.after_round(1, 25600, 20000, rate)
    d = conv.after_round(2, 20000, 19000, rate)  # q = 0.95, 76 ms predicted
    assert not d.stop and d.reason == "retry"
    d = conv.after_round(3, 19000, 18000, rate)  # stalled again: no second try
    assert d.stop and d.reason == "converged"
    conv = Convergence(MigrationOptions(max_downtime_ms=300))
    conv.after_round(1, 25600, 7000, rate)
    d = conv.after_round(2, 7000, 6800, rate)  # 27 ms: under a tenth of the limit, stop
    assert d.stop and d.reason == "converged"
