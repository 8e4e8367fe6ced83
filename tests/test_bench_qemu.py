"""One small QEMU live migration of the hotset guest (QEMU's figures: the baseline)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from livemig.bench.qemu import (
    CPU_CANDIDATES,
    QemuError,
    QemuMigrationConfig,
    QemuNotFoundError,
    clear_cpu_model_cache,
    cpu_model_boots,
    find_qemu,
    guest_gap_ms,
    kvm_available,
    probe_cpu_model,
    run_qemu_migration,
)
from livemig.bench.report import build_report, report_json, report_table

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
    # Both sides ran the probed CPU model, and the result says which.
    assert d["cpu_model"] == (os.environ.get("LIVEMIG_QEMU_CPU")
                              or probe_cpu_model(find_qemu(), cfg))


@needs_qemu
@needs_kvm
@needs_image
@pytest.mark.timeout(120)
def test_cpu_probe_picks_a_model_that_starts() -> None:
    cfg = QemuMigrationConfig(image=str(HOTSET), cmdline="wss=16M", mem="128M")
    binary = find_qemu()
    clear_cpu_model_cache()
    try:
        # A model QEMU does not know is skipped; the pick is one that boots the guest.
        model = probe_cpu_model(binary, cfg, ("no-such-cpu-model", *CPU_CANDIDATES))
        assert model in CPU_CANDIDATES
        assert cpu_model_boots(binary, cfg, model) is None
        # Cached: asked again (even with other candidates), the same model, no new probe.
        assert probe_cpu_model(binary, cfg, ("no-such-cpu-model",)) == model
    finally:
        clear_cpu_model_cache()
    assert _no_leftover_qemu()


@needs_qemu
@needs_kvm
@needs_image
@pytest.mark.timeout(60)
def test_cpu_probe_without_a_working_model_is_one_line_error() -> None:
    cfg = QemuMigrationConfig(image=str(HOTSET), cmdline="wss=16M", mem="128M")
    clear_cpu_model_cache()
    try:
        with pytest.raises(QemuError, match="no -cpu model boots") as exc:
            probe_cpu_model(find_qemu(), cfg, ("no-such-cpu-model",))
    finally:
        clear_cpu_model_cache()
    assert "\n" not in str(exc.value)
    assert "no-such-cpu-model:" in str(exc.value)


def test_report_names_the_qemu_cpu_model() -> None:
    lm = {"status": "completed", "mode": "precopy", "total_ms": 100.0, "bytes_sent": 1 << 20}
    qm = {"status": "completed", "mode": "precopy", "cpu_model": "host,-arch-capabilities",
          "total_ms": 200.0, "bytes_sent": 2 << 20}
    rep = build_report("s", [lm], [qm, dict(qm)])
    assert rep["qemu"]["cpu_model"] == "host,-arch-capabilities"
    assert '"cpu_model": "host,-arch-capabilities"' in report_json(rep)
    console = Console(record=True, width=200)
    console.print(report_table(rep))
    text = console.export_text()
    assert "CPU model" in text and "host,-arch-capabilities" in text


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
