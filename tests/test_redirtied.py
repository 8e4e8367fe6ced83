"""Live rounds leave out pages dirtied again before they reach them (migration/redirtied.py):
the pages stay owed, the copy is exact, and it can be turned off."""

from __future__ import annotations

import time

import numpy as np
from memmachine import MemoryMachine, memory_config
from test_migrate_engine import Dest, Guest, connect, source

from livemig.migration import MigrationOptions, migrate
from livemig.migration.redirtied import RedirtiedSkip
from livemig.migration.stats import MigrationStats


def sweeping_migration(**opts: object) -> MigrationStats:
    """Migrate a 32 MiB machine over a slow link while its guest sweeps the data half in page
    order, lapping the sender many times a round; check the copy page for page."""
    src = source(32 << 20)
    n = len(src.memory.pages)
    g = Guest(src, np.arange(0, n // 2), burst=256, pause=0.0005)
    time.sleep(0.05)
    d = Dest()
    try:
        stats = migrate(src, connect(d.addr),
                        MigrationOptions(max_bandwidth=40e6, max_rounds=4, verify_memory=True,
                                         **opts))  # type: ignore[arg-type]
    finally:
        g.stop.set()
    d.join()
    assert d.error is None and d.machine is not None
    assert np.array_equal(d.machine.memory.pages, src.memory.pages)
    assert stats.status == "completed" and stats.verified_memory
    return stats


def test_redirtied_pages_are_skipped_and_still_arrive() -> None:
    stats = sweeping_migration()
    live = stats.rounds[:-1]
    assert live[0].skipped_pages > 0
    for r in live:  # a skipped page is owed after the round: it counts among the dirty ones
        assert r.dirty_pages >= r.skipped_pages
    assert stats.rounds[-1].skipped_pages == 0  # the paused round leaves nothing out
    assert "skipped_pages" in stats.to_json()["round_detail"][0]


def test_skipping_can_be_turned_off() -> None:
    stats = sweeping_migration(skip_redirtied=False)
    assert all(r.skipped_pages == 0 for r in stats.rounds)


def test_found_pages_are_handed_over_once() -> None:
    m = MemoryMachine(memory_config(1 << 20))
    m.memory.start_dirty_log()
    skip = RedirtiedSkip(m.memory, len(m.memory.pages), refresh_s=0.0)
    skip.begin_round()
    m.memory.write(np.array([3, 5]), 7)
    assert skip.keep(np.arange(8)).tolist() == [0, 1, 2, 4, 6, 7]
    assert skip.skipped == 2
    assert np.flatnonzero(skip.take()).tolist() == [3, 5]
    assert not skip.take().any()  # taken: the next round starts with nothing found
    assert skip.keep(np.arange(4)).tolist() == [0, 1, 2, 3]
