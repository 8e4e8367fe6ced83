"""While a migration runs in a process, the GIL changes hands every 0.5 ms (migration/gil.py)."""

from __future__ import annotations

import sys
import threading
import time

from test_migrate_engine import Dest, connect, source

from livemig.migration import MigrationOptions, migrate
from livemig.migration.gil import MIGRATION_SWITCH_INTERVAL, quick_handoff


def test_overlapping_migrations_restore_the_interval_when_the_last_ends() -> None:
    before = sys.getswitchinterval()
    first, second = quick_handoff(), quick_handoff()
    first.__enter__()
    assert sys.getswitchinterval() == MIGRATION_SWITCH_INTERVAL
    second.__enter__()
    first.__exit__(None, None, None)
    assert sys.getswitchinterval() == MIGRATION_SWITCH_INTERVAL  # one still runs
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == before


def test_a_migration_runs_with_the_short_interval() -> None:
    before = sys.getswitchinterval()
    seen: set[float] = set()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.add(sys.getswitchinterval())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    src = source(64 << 20)
    d = Dest()
    try:
        stats = migrate(src, connect(d.addr), MigrationOptions())
        d.join()
    finally:
        done.set()
        sampler.join()
    assert stats.status == "completed" and d.error is None
    assert MIGRATION_SWITCH_INTERVAL in seen
    assert sys.getswitchinterval() == before  # both sides ended: the process's own again
