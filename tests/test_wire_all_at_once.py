"""Every wire-efficiency feature in one migration of a real x86 `verify` guest (issue 9):
page streams, compression, XBZRLE and keyed dedup together, memory verified. (arm64: the
ALL_AT_ONCE case in test_arm_migrate.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import migrate_verify_guest, needs_kvm
from test_arm_migrate import ALL_AT_ONCE


@needs_kvm
def test_everything_at_once(machines: Any, tmp_path: Path) -> None:
    stats = migrate_verify_guest(machines, tmp_path, *ALL_AT_ONCE)
    assert {f"pages-{i}" for i in range(4)} <= set(stats["channels"]), stats["channels"]
    assert {"zstd", "xbzrle", "dedup"} <= set(stats["codecs"]), stats["codecs"]  # all took part
