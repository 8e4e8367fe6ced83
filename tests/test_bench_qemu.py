"""One small QEMU live migration of the hotset guest (QEMU's figures: the baseline)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from livemig.bench.qemu import (
    QemuError,
    QemuMigrationConfig,
    QemuNotFoundError,
    find_qemu,
    guest_gap_ms,
    kvm_available,
    run_qemu_migration,
)

ROOT = Path(__file__).resolve().parents[1]
HOTSET = Path(os.environ.get("LIVEMIG_HOTSET_IMAGE", ROOT / "guests" / "build" / "hotset.elf"))

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
needs_kvm = pytest.mark.skipif(
    not kvm_available(), reason="/dev/kvm is missing or not accessible")
needs_image = pytest.mark.skipif(
    not HOTSET.is_file(), reason=f"guest image {HOTSET} not built (make -C guests)")


@needs_qemu
@needs_kvm
@needs_image
@pytest.mark.timeout(60)
def test_qemu_migration_small(tmp_path: Path) -> None:
    cfg = QemuMigrationConfig(image=str(HOTSET), cmdline="wss=16M", mem="256M",
                              migrate_timeout_s=30, log_dir=str(tmp_path))
    res = run_qemu_migration(cfg)
    d = res.to_dict()
    assert d["status"] == "completed", d
    assert d["downtime_ms"] > 0
    assert d["total_ms"] >= d["downtime_ms"]
    assert d["bytes_sent"] > 0
    assert d["rounds"] >= 1
    assert d["pages"]["raw"] > 0
    assert set(d) >= {"status", "mode", "total_ms", "downtime_ms", "setup_ms", "rounds",
                      "bytes_sent", "pages", "guest_gap_ms"}
    # The guest keeps running on the destination, counting on from the source.
    assert res.hb_dest_count >= cfg.settle_heartbeats
    assert res.heartbeats_continue, d
    assert d["guest_gap_ms"] is not None and d["guest_gap_ms"] > 0
    assert b"hb" in (tmp_path / "dest.serial.log").read_bytes()
    assert _no_leftover_qemu()


def _no_leftover_qemu() -> bool:
    """No QEMU process of this test is still running (cleanup happened)."""
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmd.read_bytes()
        except OSError:
            continue
        if b"qemu-system" in text and b"livemig-qemu-" in text:
            return False
    return True


def test_missing_qemu_is_a_clear_error() -> None:
    with pytest.raises(QemuNotFoundError, match="not found"):
        find_qemu("qemu-system-does-not-exist")


@needs_qemu
@needs_kvm
def test_missing_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="image not found"):
        run_qemu_migration(QemuMigrationConfig(image=str(tmp_path / "nope.elf")))


def test_guest_gap() -> None:
    src = [(1.0, 1), (1.1, 2), (1.2, 3)]
    dst = [(1.6, 4), (1.7, 5)]
    assert guest_gap_ms(src, dst, since=1.15) == pytest.approx(400.0)
    assert guest_gap_ms(src, [], since=1.15) is None
