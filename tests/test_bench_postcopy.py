"""`livemig bench postcopy [--vs-qemu]`: livemig's post-copy and hybrid against QEMU's
postcopy-ram on the same guest, in one run (issue 10, item 4)."""

from __future__ import annotations

import io
import json
import shutil
from typing import Any

import pytest
from conftest import needs_kvm, run_cli
from rich.console import Console

from livemig.bench import grid, report
from livemig.bench import postcopy as pcbench
from livemig.bench.qemu import QemuMigrationConfig, migration_settings, stop_to_resume_ms

HAS_QEMU = shutil.which("qemu-system-x86_64") is not None


def _check_faults(name: str, lm: dict) -> None:
    f = lm["faults"]
    assert f["pushed"] + f["pulled"] > 0, (name, f)  # every owed page went one way
    assert 0 < f["last_page_ms"] <= lm["total_ms"], (name, lm)
    if f["count"]:
        lat = f["latency_ms"]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["max"], (name, f)
        assert f["blocked_ms"] > 0


@needs_kvm
@pytest.mark.timeout(600)
def test_bench_postcopy_quick() -> None:
    args = ["bench", "postcopy", "--mem", "256M", "--wss", "16M", "--repeat", "1",
            "--timeout", "120", "--json"]
    if HAS_QEMU:  # without QEMU the livemig rows still run; the QEMU side says not-run
        args.insert(2, "--vs-qemu")
    res = run_cli(*args, timeout=560)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["grid"] == "postcopy" and out["settings"]["link"] is None
    rows = {r["row"]: r for r in out["rows"]}
    assert list(rows) == ["postcopy", "hybrid-1", "hybrid-5"]
    for name, rep in rows.items():
        lm = rep["livemig"]
        assert lm["status"] == "completed", (name, lm)
        assert lm["mode"] == ("postcopy" if name == "postcopy" else "hybrid"), (name, lm)
        assert lm["total_ms"] > 0 and lm["downtime_ms"] > 0 and lm["bytes_sent"] > 0
        assert lm["heartbeats"]["dest_failures"] == 0
        went_postcopy = any(e["event"] == "postcopy" for e in lm["events"])
        assert went_postcopy or name != "postcopy", lm  # a hybrid may converge as pre-copy
        if went_postcopy:
            _check_faults(name, lm)
        qm = rep["qemu"]
        if not HAS_QEMU:
            assert qm["status"] == "not-run"
            continue
        assert qm["status"] == "completed", (name, qm)
        assert qm["heartbeats"]["continue"], (name, qm)
        # The guest's pause seen from the QMP events covers QEMU's own downtime figure.
        assert qm["stop_to_resume_ms"] is not None and qm["stop_to_resume_ms"] > 0, qm
        assert qm["settings"]["source"]["capabilities"]["postcopy-ram"] is True
        assert qm["settings"]["dest"]["capabilities"] == {"postcopy-ram": True,
                                                          "postcopy-blocktime": True}
        if name == "postcopy":  # started at once: QEMU cannot have finished as pre-copy
            assert qm["mode"] == "postcopy", qm
            assert qm["faults"]["count"] >= 0 and qm["faults"]["latency_ms"] is None
            assert rep["ratios"]["total"] is not None and rep["ratios"]["total"] > 0
        else:  # switched once the rounds were done (unless it completed as pre-copy first)
            assert qm["mode"] in ("postcopy", "precopy"), qm
            if qm["mode"] == "postcopy":
                assert qm["postcopy_round"] >= int(name.split("-")[1]) + 1, qm
    goals = {(g["row"], g["figure"]): g for g in out["goals"]}
    assert set(goals) == {("postcopy", "total"), ("hybrid-1", "state_sent"),
                          ("hybrid-1", "stop_to_resume"), ("hybrid-5", "state_sent"),
                          ("hybrid-5", "stop_to_resume"),
                          ("postcopy", "livemig.faults.latency_ms.p50")}
    if HAS_QEMU:
        assert goals[("postcopy", "total")]["value"] == rows["postcopy"]["ratios"]["total"]


def test_rows_configure_both_sides_alike() -> None:
    rows = {r.name: r for r in pcbench.postcopy_rows("1gbit")}
    assert list(rows) == list(pcbench.ROW_NAMES) == ["postcopy", "hybrid-1", "hybrid-5"]
    assert rows["postcopy"].mode == "postcopy" and rows["postcopy"].livemig_args == ()
    assert rows["postcopy"].qemu["postcopy_after"] == 0
    for n in (1, 5):
        r = rows[f"hybrid-{n}"]
        assert r.mode == "hybrid" and r.livemig_args == ("--postcopy-after", str(n))
        assert r.qemu["postcopy_after"] == n
    assert all(r.link == "1gbit" for r in rows.values())
    # The fault latency goal is for loopback.
    assert len(pcbench.postcopy_goals(None)) == len(pcbench.postcopy_goals("1gbit")) + 1


def test_qemu_postcopy_settings() -> None:
    cfg = QemuMigrationConfig("x.elf", postcopy_after=1, downtime_limit_ms=1,
                              max_bandwidth=None)
    assert migration_settings(cfg, "source") == ({"postcopy-ram": True}, {"downtime-limit": 1})
    assert migration_settings(cfg, "dest") == (
        {"postcopy-ram": True, "postcopy-blocktime": True}, {})


def _side(mode: str, total: float, down: float, faults: dict[str, Any] | None) -> dict[str, Any]:
    d: dict[str, Any] = {"status": "completed", "mode": mode, "total_ms": total,
                         "downtime_ms": down, "guest_gap_ms": 50.0, "rounds": 2,
                         "bytes_sent": 1 << 20}
    if mode != "hybrid":  # QEMU's: its pause from the events, longer than its own figure
        d["stop_to_resume_ms"] = down * 5
    if mode != "precopy":  # livemig's pause to STATE sent (QEMU's: its downtime covers it)
        d["state_sent_ms"] = down / 4
    if faults is not None:
        d["faults"] = faults
    return d


def _fake_result() -> dict[str, Any]:
    ours = {"count": 7, "latency_ms": {"p50": 0.15, "p90": 0.4, "p99": 1.2, "max": 2.0},
            "blocked_ms": 3.0, "pushed": 100, "pulled": 7, "last_page_ms": 90.0}
    qemu_pc = {"count": 2, "blocked_ms": 5.0, "latency_ms": None}
    reps = []
    for name, lm_mode, qms in (
            ("postcopy", "postcopy", [_side("postcopy", 200, 2, qemu_pc)]),
            # one QEMU run of two completed as pre-copy: left out of QEMU's medians
            ("hybrid-1", "hybrid", [_side("precopy", 300, 40, None),
                                    _side("postcopy", 100, 4, qemu_pc)]),
            ("hybrid-5", "hybrid", [_side("precopy", 300, 40, None)])):
        ours_runs = [_side(lm_mode, 100, 10, ours)]
        rep = report.build_report(name, ours_runs, qms, ratio_keys=report.GRID_RATIO_KEYS)
        rep.update(row=name, network="loopback (host)", runs={"livemig": ours_runs,
                                                               "qemu": qms})
        pcbench.only_postcopy_runs(rep)
        pcbench.state_sent_ratio(rep)
        reps.append(rep)
    result = {"grid": "postcopy", "settings": {"mem": 1 << 30, "wss": "100M"}, "rows": reps,
              "goals": grid.check_goals(reps, pcbench.postcopy_goals())}
    pcbench.compared_with_postcopy(result)
    return result


def test_goals_need_qemu_to_have_post_copied() -> None:
    res = _fake_result()
    goals = {(g["row"], g["figure"]): g for g in res["goals"]}
    assert goals[("postcopy", "total")]["value"] == 0.5 and goals[("postcopy", "total")]["met"]
    h1 = goals[("hybrid-1", "state_sent")]
    assert h1["value"] == 0.625 and h1["met"]  # 2.5 ms to STATE vs QEMU's 4 ms (post-copy run)
    assert h1["note"] == "1 of 2 QEMU runs completed as pre-copy, left out"
    h1 = goals[("hybrid-1", "stop_to_resume")]
    assert h1["value"] == 0.5 and h1["met"]  # 10 ms vs 20 ms from STOP to RESUME
    h5 = goals[("hybrid-5", "state_sent")]
    assert h5["met"] is None and "precopy" in h5["note"]  # QEMU did not post-copy
    p50 = goals[("postcopy", "livemig.faults.latency_ms.p50")]
    assert p50["value"] == 0.15 and p50["met"]


def test_table_shows_faults_and_what_qemu_does_not_measure() -> None:
    buf = io.StringIO()
    report.print_grid(_fake_result(), Console(file=buf, width=160))
    text = buf.getvalue()
    assert "postcopy: hotset" in text
    for label in ("fault p50", "fault p99", "vCPU blocked", "pages pulled", "last page at"):
        assert label in text
    assert "150 us" in text and "n/a" in text
    assert "QEMU completed as precopy, not post-copy" in text


def test_stop_to_resume_from_qmp_events() -> None:
    def ev(name: str, t: float) -> dict[str, Any]:
        return {"event": name, "timestamp": {"seconds": int(t), "microseconds":
                                             round((t - int(t)) * 1e6)}}
    src = [ev("STOP", 100.0), ev("RESUME", 100.5), ev("STOP", 101.25)]
    dst = [ev("RESUME", 101.5), ev("STOP", 102.0)]
    assert stop_to_resume_ms(src, dst) == pytest.approx(250.0)
    assert stop_to_resume_ms(src, []) is None
    assert stop_to_resume_ms([ev("STOP", 103.0)], dst) is None  # RESUME came before


@pytest.mark.parametrize("args", [["--link", "fast"], ["--rows", "hybrid-3"]])
def test_bad_options_refused_in_one_line(args: list[str]) -> None:
    res = run_cli("bench", "postcopy", *args, timeout=30)
    assert res.returncode == 2, res
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stdout == ""
