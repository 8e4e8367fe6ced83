"""Post-copy and hybrid migration on real guests (issue 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import migrate_verify_guest, needs_kvm

pytestmark = needs_kvm


@pytest.mark.parametrize("flags", [("--mode", "postcopy"),
                                   ("--mode", "hybrid", "--postcopy-after", "2")],
                         ids=["postcopy", "hybrid"])
def test_verify_guest_postcopy(machines, tmp_path: Path, flags: tuple[str, ...]) -> None:
    stats = migrate_verify_guest(machines, tmp_path, *flags)
    f = stats["faults"]
    assert f["pushed"] + f["pulled"] > 0, f
    assert stats["mode"] == flags[1]

