"""Medians, ratios, raw-copy fraction and output of livemig.bench.report."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from livemig.bench import report as rp


def result(total: float, down: float, nbytes: int, status: str = "completed") -> dict:
    return {
        "status": status, "mode": "precopy", "total_ms": total, "downtime_ms": down,
        "setup_ms": 2.0, "rounds": 3, "bytes_sent": nbytes,
        "pages": {"raw": nbytes // 4096, "zero": 10}, "guest_gap_ms": down + 5,
    }


def test_median_dict_numbers_nested_and_strings() -> None:
    runs = [result(100, 10, 4096), result(300, 30, 3 * 4096), result(200, 20, 2 * 4096)]
    m = rp.median_dict(runs)
    assert m["total_ms"] == 200.0
    assert m["downtime_ms"] == 20.0
    assert m["bytes_sent"] == 2 * 4096 and isinstance(m["bytes_sent"], int)
    assert m["pages"] == {"raw": 2, "zero": 10}
    assert m["mode"] == "precopy"
    assert m["status"] == "completed"
    assert m["repeats"] == 3


def test_median_dict_even_count_and_failures() -> None:
    runs = [result(100, 10, 1), result(200, 20, 2, status="failed")]
    m = rp.median_dict(runs)
    assert m["total_ms"] == 150.0
    assert m["bytes_sent"] == 1.5
    assert m["status"] == "failed"
    with pytest.raises(ValueError):
        rp.median_dict([])


def test_median_ignores_missing_values() -> None:
    a, b = result(100, 10, 1), result(300, 30, 3)
    a["guest_gap_ms"] = None
    assert rp.median_dict([a, b])["guest_gap_ms"] == 35.0


def test_ratios() -> None:
    r = rp.ratios(result(50, 30, 2000), result(100, 10, 1000))
    assert r == {"total": 0.5, "downtime": 3.0, "bytes": 2.0}
    assert rp.ratios({"total_ms": 1}, {"total_ms": 0}) == {
        "total": None, "downtime": None, "bytes": None}


def test_raw_copy_fraction() -> None:
    lm = result(1000, 10, 700_000_000)  # 0.7 GB/s
    assert rp.throughput(lm) == pytest.approx(7e8)
    assert rp.raw_copy_fraction(lm, 1e9) == pytest.approx(0.7)
    assert rp.raw_copy_fraction(lm, None) is None
    assert rp.raw_copy_fraction({"bytes_per_s": 5e8, "total_ms": 1}, 1e9) == 0.5
    assert rp.throughput({"total_ms": 0, "bytes_sent": 5}) is None


def test_build_report_shape_and_json() -> None:
    lm_runs = [result(90, 10, 4096), result(110, 12, 4096), result(100, 11, 4096)]
    rep = rp.build_report("hotset-1G-100M", lm_runs, result(200, 22, 8192),
                          raw_copy_bytes_per_s=4096 * 10 / 1.0)
    assert rep["scenario"] == "hotset-1G-100M"
    assert rep["livemig"]["total_ms"] == 100.0
    assert rep["ratios"] == {"total": 0.5, "downtime": 0.5, "bytes": 0.5}
    # 4096 bytes in 100 ms = 40960 B/s = the raw rate
    assert rep["raw_copy_fraction"] == pytest.approx(1.0)
    back = json.loads(rp.report_json(rep))
    assert set(back) >= {"scenario", "livemig", "qemu", "ratios", "raw_copy_fraction"}
    assert back["ratios"]["bytes"] == 0.5


def test_print_report_table() -> None:
    rep = rp.build_report("s", result(100, 10, 1 << 20), result(200, 20, 2 << 20), 1e7)
    buf = io.StringIO()
    rp.print_report(rep, Console(file=buf, width=120))
    out = buf.getvalue()
    for word in ("downtime", "0.50x", "raw copy", "MiB", "scenario: s"):
        assert word in out
