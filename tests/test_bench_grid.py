"""`livemig bench precopy --grid/--rows`: the scenario grid, livemig vs QEMU row by row."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_kvm, run_cli
from rich.console import Console

from livemig.bench import grid, netns, plot, report
from livemig.bench.qemu import QemuMigrationConfig, migration_settings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed: no QEMU side")


@needs_kvm
@needs_qemu
@pytest.mark.timeout(600)
def test_small_grid_end_to_end(tmp_path: Path) -> None:
    png = tmp_path / "grid.png"
    res = run_cli("bench", "precopy", "--rows", "default,streams2", "--mem", "256M",
                  "--wss", "16M", "--repeat", "1", "--timeout", "60", "--json",
                  "--plot", str(png), timeout=560)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["settings"]["mem"] == 256 << 20
    rows = {r["row"]: r for r in out["rows"]}
    assert list(rows) == ["default", "streams2"]
    for name, rep in rows.items():
        lm, qm = rep["livemig"], rep["qemu"]
        assert lm["status"] == "completed", (name, lm)
        assert qm["status"] == "completed", (name, qm)
        for side in (lm, qm):
            assert side["total_ms"] > 0 and side["downtime_ms"] > 0
            assert side["bytes_sent"] > 0 and side["rounds"] >= 1
            assert side["guest_gap_ms"] is not None
        assert lm["heartbeats"]["dest_failures"] == 0
        assert qm["heartbeats"]["continue"]
        for key in ("total", "downtime", "guest_gap", "bytes", "rounds"):
            assert rep["ratios"][key] is not None and rep["ratios"][key] > 0, (name, key)
        assert rep["raw_copy_bytes_per_s"] > 0 and rep["raw_copy_fraction"] > 0
        assert len(rep["runs"]["livemig"]) == len(rep["runs"]["qemu"]) == 1
    # The same settings on both sides: two page streams, two multifd channels.
    assert "--streams" in rows["streams2"]["livemig_args"]
    qset = rows["streams2"]["qemu"]["settings"]
    for side in ("source", "dest"):
        assert qset[side]["capabilities"] == {"multifd": True}
        assert qset[side]["parameters"]["multifd-channels"] == 2
    assert "multifd" not in rows["default"]["qemu"]["settings"]["source"]["capabilities"]
    # The default row's throughput is also set against the raw copy beside a running guest.
    d = rows["default"]
    assert len(d["runs"]["raw_copy_loaded_bytes_per_s"]) == 1
    assert d["raw_copy_loaded_bytes_per_s"] > 0 and d["raw_copy_loaded_fraction"] > 0
    assert "raw_copy_loaded_bytes_per_s" not in rows["streams2"]
    assert png.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("rows", ["default,bogus", "nope", ",", "streams3"])
def test_unknown_rows_are_refused_in_one_line(rows: str) -> None:
    res = run_cli("bench", "precopy", "--rows", rows, timeout=30)
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "default" in lines[0]  # names the rows there are
    assert res.stdout == ""


def test_grid_and_rows_together_refused() -> None:
    res = run_cli("bench", "precopy", "--grid", "--rows", "default", timeout=30)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


def test_parse_rows() -> None:
    assert grid.parse_rows("default, streams2,default") == ["default", "streams2"]
    assert set(grid.ROW_NAMES) >= {"default", "plain", "streams2", "streams4", "xbzrle", "zstd",
                                   "auto-converge", "idle-1g", "idle-4g", "zstd-1gbit"}
    with pytest.raises(ValueError, match="unknown rows 'a', 'b'"):
        grid.parse_rows("a,default,b")


def test_rows_configure_both_sides_alike() -> None:
    rows = {r.name: r for r in grid.grid_rows(grid.GridSettings(xbzrle_cache=32 << 20))}
    assert rows["streams4"].livemig_args == ("--streams", "4")
    assert rows["streams4"].qemu == {"multifd_channels": 4}
    assert rows["xbzrle"].livemig_args == ("--xbzrle", "--xbzrle-cache", str(32 << 20))
    assert rows["xbzrle"].qemu == {"xbzrle_cache_size": 32 << 20}
    assert rows["auto-converge"].max_downtime_ms == 10.0
    assert rows["idle-4g"].mem == 4 << 30 and rows["idle-4g"].workload == "idle"
    assert rows["zstd-1gbit"].link == "1gbit"
    s = grid.GridSettings(mem=1 << 30, wss="50M")
    rows = {r.name: r for r in grid.grid_rows(s)}
    assert grid.guest_cmdline(rows["default"], s) == "wss=50M"
    assert grid.guest_cmdline(rows["plain"], s) == "hot=4M cold=768M coldrate=0"
    assert grid.guest_cmdline(rows["idle-1g"], s) == ""
    assert rows["plain"].livemig_args == () and rows["plain"].qemu == {}


def test_qemu_settings_for_each_side() -> None:
    cfg = QemuMigrationConfig("x.elf", multifd_channels=1, multifd_compression="zstd",
                              xbzrle_cache_size=1 << 26, auto_converge=True,
                              downtime_limit_ms=10, max_bandwidth=None)
    caps, params = migration_settings(cfg, "source")
    assert caps == {"multifd": True, "xbzrle": True, "auto-converge": True}
    assert params == {"multifd-channels": 1, "multifd-compression": "zstd",
                      "xbzrle-cache-size": 1 << 26, "downtime-limit": 10}
    caps, params = migration_settings(cfg, "dest")
    assert caps == {"multifd": True}
    assert params == {"multifd-channels": 1, "multifd-compression": "zstd"}
    assert migration_settings(QemuMigrationConfig("x.elf", max_bandwidth=None), "dest") == (
        {}, {})


def _result(total: float, nbytes: int, rounds: int = 3) -> dict[str, Any]:
    return {"status": "completed", "mode": "precopy", "total_ms": total, "downtime_ms": 10.0,
            "guest_gap_ms": 50.0, "rounds": rounds, "bytes_sent": nbytes,
            "round_detail": [
                {"number": i + 1, "pages": {"raw": 1000 // (i + 1), "zero": 5},
                 "bytes_sent": nbytes // rounds, "duration_ms": total / (rounds + 1)}
                for i in range(rounds)],
            "events": [{"t_ms": 5.0, "event": "setup-done"},
                       {"t_ms": total * 0.8, "event": "paused"}]}


def _fake_grid() -> dict[str, Any]:
    ok = grid.GridSettings()
    reps = []
    rep = report.build_report("default", [_result(100, 4 << 20)], [_result(200, 8 << 20)],
                              1e9, ratio_keys=report.GRID_RATIO_KEYS)
    rep.update(row="default", network="loopback (host)",
               runs={"livemig": [_result(100, 4 << 20)]}, raw_copy_loaded_bytes_per_s=5e8,
               raw_copy_loaded_fraction=0.08)
    reps.append(rep)
    bad = report.build_report("zstd", [_result(120, 1 << 20)],
                              [grid.failed("unsupported", "this QEMU build has no "
                                           "multifd-compression zstd\n(details)")],
                              None, ratio_keys=report.GRID_RATIO_KEYS)
    bad.update(row="zstd", network="loopback (host)", raw_copy_error="raw copy failed: x")
    reps.append(bad)
    return {"settings": {"mem": ok.mem, "wss": ok.wss, "vcpus": 1, "repeat": 1}, "rows": reps}


def test_grid_table_shows_ratios_and_why_a_side_did_not_run() -> None:
    g = _fake_grid()
    buf = io.StringIO()
    report.print_grid(g, Console(file=buf, width=140))
    out = buf.getvalue()
    for word in ("default", "0.50x", "guest gap", "throughput", "of raw", "zstd",
                 "raw copy, guest running", "0.08 of it",
                 "unsupported", "QEMU: why", "no multifd-compression zstd", "raw copy failed"):
        assert word in out, word
    assert g["rows"][0]["ratios"]["total"] == 0.5
    assert g["rows"][1]["ratios"]["total"] is None
    assert "\n" not in g["rows"][1]["qemu"]["error"]
    json.dumps(g)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "rounds.png"
    assert plot.plot_rounds(_fake_grid(), str(path)) == 2
    assert path.read_bytes().startswith(PNG_MAGIC)
    # Rounds placed in time: the first at setup-done, the last at paused.
    series = plot.round_series(_result(100, 3 << 20))
    assert series[0]["start_ms"] == 5.0 and series[-1]["start_ms"] == 80.0
    assert series[0]["pages"] == 1005 and series[0]["rate"] > 0
    empty = tmp_path / "empty.png"
    assert plot.plot_rounds({"rows": []}, str(empty)) == 0
    assert empty.read_bytes().startswith(PNG_MAGIC)


def test_plot_must_be_png() -> None:
    res = run_cli("bench", "precopy", "--rows", "default", "--plot", "out.pdf", timeout=30)
    assert res.returncode == 2 and "PNG" in res.stderr


def test_a_row_that_cannot_run_says_why_and_the_grid_goes_on(tmp_path: Path) -> None:
    s = grid.GridSettings(mem=16 << 20, netns=False)
    broken = grid.Row("broken", "a workload that does not exist", workload="no-such-workload")
    with netns.host_loopback() as net:
        rep = grid.run_row(broken, s, net)
    for side in ("livemig", "qemu"):
        assert rep[side]["status"] in ("error", "unavailable"), rep[side]
        assert "no-such-workload" in rep[side]["error"] or side == "qemu", rep[side]
        assert "\n" not in rep[side]["error"]
    assert rep["ratios"]["total"] is None
    # A network that could not be made: both sides say so, nothing is run.
    rep = grid.run_row(broken, s, "cannot set up a 1gbit netns link: needs root")
    assert rep["livemig"]["status"] == "unavailable"
    assert rep["livemig"]["error"] == "cannot set up a 1gbit netns link: needs root"
    assert rep["qemu"]["status"] == "unavailable" and rep["runs"]["raw_copy_bytes_per_s"] == []
    # A guest larger than the memory left: the row says so.
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 4000000 kB\nMemAvailable: 2097152 kB\n")
    assert grid.memory_short(4 << 30, str(meminfo)).startswith("a 4.0 GiB guest does not fit")
    assert grid.memory_short(512 << 20, str(meminfo)) is None


def test_goals_are_checked_from_the_rows() -> None:
    g = _fake_grid()
    goals = {(x["row"], x["figure"]): x for x in grid.check_goals(g["rows"])}
    assert goals[("default", "total")]["value"] == 0.5 and goals[("default", "total")]["met"]
    assert goals[("default", "downtime")]["met"] is False  # 10 ms each: 1.0 > 0.8
    assert goals[("default", "raw_copy_fraction")]["met"] is False
    assert goals[("idle-4g", "total")]["met"] is None  # row not run
    g["goals"] = list(goals.values())
    buf = io.StringIO()
    report.print_grid(g, Console(file=buf, width=140))
    assert "not measured" in buf.getvalue() and "not met" in buf.getvalue()
