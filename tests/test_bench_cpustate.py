"""`livemig bench cpu-state`: the thesis' Table 5/6 experiment on the ARMv8 board (no KVM)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from livemig.arm import Armv8Machine
from livemig.bench import cpustate
from livemig.bench.cpustate_wire import PeerError, pack_registers, unpack_registers
from livemig.contract import Arch, MachineConfig, StateError


def test_bench_cpu_state_json() -> None:
    res = run_cli("bench", "cpu-state", "--arch", "arm64", "--vcpus", "2", "--regs", "4,34",
                  "--repeat", "2", "--json", timeout=120)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["benchmark"] == "cpu-state" and rep["arch"] == "arm64" and rep["vcpus"] == 2
    assert rep["register_order"][:4] == ["sp", "lr", "pc", "pstate"]
    assert rep["register_order"][4:] == [f"x{i}" for i in range(30)]
    assert [r["regs"] for r in rep["rows"]] == [4, 34]
    for row, thesis in zip(rep["rows"], (39.558973, 216.740826), strict=True):
        assert row["names"] == rep["register_order"][:row["regs"]]
        assert row["bytes"] == 8 * row["regs"] * 2
        assert row["thesis_ms"] == pytest.approx(thesis)
        assert len(row["runs_ms"]) == 2 and all(v > 0 for v in row["runs_ms"])
        for key in ("median_ms", "pause_ms", "capture_ms", "transfer_ms", "adopt_ms", "ratio"):
            assert row[key] > 0, key
        assert row["adopted_exact"] is True  # the destination holds exactly the source's values
    full = rep["full_state"]
    assert full["bytes"] > 2 * 34 * 8 and full["median_ms"] > 0 and full["adopted_exact"]
    t6 = rep["table6"]
    assert len(t6["runs_ms"]) == 2 and len(t6["thesis_runs_ms"]) == 10
    assert t6["thesis_median_ms"] == pytest.approx(413.94, abs=0.01) and t6["median_ms"] > 0
    assert rep["peer_pid"] and rep["guest"]["failures"] == 0 and rep["guest"]["error"] is None
    assert rep["guest"]["heartbeats_during"] > 0


def test_bench_cpu_state_table() -> None:
    res = run_cli("bench", "cpu-state", "--regs", "4", "--repeat", "1", "--no-full-state",
                  timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Table 5" in res.stdout and "39.56" in res.stdout and "Table 6" not in res.stdout


def test_bad_register_count_is_refused() -> None:
    res = run_cli("bench", "cpu-state", "--regs", "4,35")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "35" in res.stderr


def test_register_names_follow_the_thesis() -> None:
    assert cpustate.register_names(4) == ["sp", "lr", "pc", "pstate"]
    assert cpustate.register_names(8)[4:] == ["x0", "x1", "x2", "x3"]
    with pytest.raises(cpustate.BenchError):
        cpustate.register_names(0)


def test_pack_roundtrip_and_size_check() -> None:
    names = ["sp", "lr", "pc"]
    regs = [{"sp": 1, "lr": 2, "pc": 3}, {"sp": 2**64 - 1, "lr": 0, "pc": 7}]
    assert unpack_registers(pack_registers(regs, names), names, 2) == regs
    with pytest.raises(PeerError):
        unpack_registers(b"\0" * 40, names, 2)


def test_set_registers_checks_before_writing() -> None:
    m = Armv8Machine(MachineConfig(Arch.ARM64, 16 << 20, 2))
    try:
        before = m.get_registers(1, ["x0", "sp", "lr"])
        with pytest.raises(StateError):
            m.set_registers(1, {"x0": 5, "v0": 1})
        with pytest.raises(StateError):
            m.set_registers(1, {"x0": 5, "sp": -1})
        assert m.get_registers(1, ["x0", "sp", "lr"]) == before
        m.set_registers(1, {"x0": 5, "sp": 0x4000_1000, "lr": 9, "pstate": 0x3C5})
        assert m.get_registers(1, ["x0", "sp", "sp_el1", "lr", "x30"]) == {
            "x0": 5, "sp": 0x4000_1000, "sp_el1": 0x4000_1000, "lr": 9, "x30": 9}
    finally:
        m.close()
