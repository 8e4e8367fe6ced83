"""The ARM thesis experiments as `livemig bench` commands, each run in a quick form (no KVM):
essential-state, cpu-state --transport udp (Tables 5/6 like for like) and cpu-load."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli

from livemig.bench import arm_essential


def test_essential_state_quick(tmp_path: Path) -> None:
    res = run_cli("bench", "essential-state", "--guests", "idle,cpustate", "--groups",
                  "none,gic,el1 vbar", "--repeat", "1", "--observe", "0.8", "--out",
                  str(tmp_path), "--json", timeout=180)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    cell = {(t["guest"], t["group"]): t for t in rep["trials"]}
    assert len(cell) == 6
    for guest in ("idle", "cpustate"):
        assert cell[(guest, "none")]["outcome"] == "survives", cell[(guest, "none")]
        # without the GIC's state no interrupt reaches the guest: its timer heartbeat stops
        assert cell[(guest, "gic")]["outcome"] == "hangs", cell[(guest, "gic")]
    # cpustate re-checks VBAR_EL1 against its boot value: index 79 (docs/guest-abi.md)
    assert cell[("cpustate", "el1 vbar")]["outcome"] == "wrong values"
    assert "value 79" in cell[("cpustate", "el1 vbar")]["detail"]
    assert json.loads((tmp_path / "essential-state.json").read_text()) == rep
    assert (tmp_path / "essential-state.png").read_bytes()[:4] == b"\x89PNG"


def test_essential_state_groups_cover_the_whole_vcpu_map() -> None:
    from livemig.arm import regs

    named = {n for names, _, _ in arm_essential.GROUPS.values() for n in names}
    assert named == set(regs.ALL_NAMES)


def test_cpu_state_over_udp_quick(tmp_path: Path) -> None:
    console = tmp_path / "console.txt"
    res = run_cli("bench", "cpu-state", "--transport", "udp", "--regs", "4,34", "--repeat", "2",
                  "--console-baud", "0", "--console", str(console), "--out", str(tmp_path),
                  "--json", timeout=120)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    udp = rep["udp"]
    assert rep["transport"] == "udp" and udp["datagram_bytes"] == 200
    assert [r["regs"] for r in udp["rows"]] == [4, 34]
    for r in udp["rows"]:
        assert r["adopted_exact"] is True  # the destination holds the source's 64-bit values
        assert len(r["thesis_interval_runs_ms"]) == 2 and len(r["livemig_runs_ms"]) == 2
        assert r["thesis_interval_ms"] > 0 and r["livemig_ms"] > 0 and r["roundtrip_ms"] > 0
    assert udp["peer_received"] == {"thesis": 4, "registers": 4, "dropped": 0}
    lines = console.read_text().splitlines()
    assert len(lines) == 2 * 2 * (4 + 34) and lines[0].startswith("vcpu0 sp = 0x")
    assert rep["guest"]["failures"] == 0 and rep["guest"]["error"] is None
    assert (tmp_path / "cpu-state.png").read_bytes()[:4] == b"\x89PNG"

    table = run_cli("bench", "cpu-state", "--transport", "udp", "--regs", "4", "--repeat", "1",
                    "--console-baud", "0", timeout=120)
    assert table.returncode == 0, table.stderr
    assert "Table 5 over UDP" in table.stdout and "39.56" in table.stdout


def test_cpu_load_quick(tmp_path: Path) -> None:
    res = run_cli("bench", "cpu-load", "--seconds", "0.5", "--vcpus", "1", "--mem", "32",
                  "--out", str(tmp_path), "--json", timeout=180)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    states = rep["states"]
    assert [s["state"] for s in states] == ["board booted", "guest booted", "guest running",
                                            "during migration"]
    for s in states:
        assert len(s["per_core_pct"]) == rep["cores"] > 0
        assert all(0 <= v <= 100 for v in s["per_core_pct"]) and s["livemig_pct"] >= 0
    assert states[0]["heartbeats_per_s"] == 0  # paused: the guest does not run
    assert states[1]["heartbeats_per_s"] > 0 and states[2]["heartbeats_per_s"] > 0
    assert len(states[3]["livemig_per_core_pct"]) == rep["cores"]
    assert (tmp_path / "cpu-load.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_line_and_status_2(tmp_path: Path) -> None:
    for args in (["essential-state", "--groups", "nosuch"],
                 ["essential-state", "--out", str(tmp_path / "missing")],
                 ["cpu-load", "--out", str(tmp_path / "missing")],
                 ["cpu-state", "--transport", "udp", "--out", str(tmp_path / "missing")]):
        res = run_cli("bench", *args)
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr
