"""Save a running machine in one process, restore it in another; bad input is refused cleanly."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from conftest import image, needs_kvm, run_cli

from livemig import snapshot


def assert_clean_error(res, fragment: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert fragment in lines[0], lines[0]


@needs_kvm
@pytest.mark.parametrize("workload,cmdline", [("verify", "wss=4M rate=2000"),
                                              ("cpustate", "hb=50")])
def test_save_restore_in_another_process(machines, tmp_path: Path, workload: str,
                                         cmdline: str) -> None:
    src = machines(["run", image(workload), "--mem", "512M", "--vcpus", "2",
                    "--append", cmdline], "src")
    src.wait_heartbeat_above(2, timeout=60)  # two vCPUs booting on a loaded host
    snap = tmp_path / "snap.lms"
    res = run_cli("save", src.control, str(snap), "--stop")
    assert res.returncode == 0, res.stderr
    src.proc.wait(10)
    saved_hb = int(snapshot.read(str(snap)).state.devices["probe"]["last_heartbeat"]["value"])
    dst = machines(["restore", str(snap)], "dst")
    first = dst.wait_heartbeat_above(-1, timeout=30)
    assert saved_hb < first <= saved_hb + 3, (saved_hb, first)  # continues, not restarted
    dst.wait_heartbeat_above(first + 3, timeout=30)
    assert dst.failures() == 0
    assert dst.ctl("status")["error"] is None


@needs_kvm
def test_corrupted_snapshot_is_refused(machines, tmp_path: Path) -> None:
    src = machines(["run", image("hotset"), "--mem", "64M", "--append", "wss=8M"], "src")
    src.wait_heartbeat_above(0)
    snap = tmp_path / "snap.lms"
    assert run_cli("save", src.control, str(snap)).returncode == 0
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snap.write_bytes(bytes(data))
    assert_clean_error(run_cli("restore", str(snap)), "checksum")


def test_snapshot_of_other_version_is_refused(tmp_path: Path) -> None:
    snap = tmp_path / "future.lms"
    snap.write_bytes(snapshot.LEGACY_HEADER.pack(snapshot.LEGACY_MAGIC, 99, 0, 0, 0, 0, 0,
                                                bytes(16)))
    assert_clean_error(run_cli("restore", str(snap)), "version 99")


def test_missing_image(tmp_path: Path) -> None:
    assert_clean_error(run_cli("run", str(tmp_path / "nope.elf")), "does not exist")


@needs_kvm
def test_not_multiboot(tmp_path: Path) -> None:
    bad = tmp_path / "bad.elf"
    bad.write_bytes(struct.pack("<I", 0x464C457F) + bytes(9000))
    assert_clean_error(run_cli("run", str(bad)), "not a multiboot image")


@needs_kvm
def test_memory_larger_than_host() -> None:
    assert_clean_error(run_cli("run", image("idle"), "--mem", "4T"), "more than this host")


def test_bad_size_option() -> None:
    res = run_cli("run", "x.elf", "--mem", "lots")
    assert res.returncode == 2 and "Traceback" not in res.stderr
