"""Benchmark reports: medians over repeats, livemig/QEMU ratios, raw-copy fraction, output.

Both sides are plain dicts with livemig's result keys (``status``, ``mode``, ``total_ms``,
``downtime_ms``, ``setup_ms``, ``rounds``, ``bytes_sent``, ``pages: {raw, zero}``,
``guest_gap_ms``); extra keys are carried along, among them QEMU's ``cpu_model`` (the ``-cpu``
model its processes ran), which the table shows too. A report is shaped::

    {"scenario": ..., "livemig": {...}, "qemu": {...},
     "ratios": {"total": x, "downtime": y, "bytes": z},
     "raw_copy_fraction": f, "raw_copy_bytes_per_s": r, "livemig_bytes_per_s": t}

A ratio is livemig / QEMU (below 1 means livemig is smaller, i.e. better); it is None when
either side lacks the figure or QEMU's is zero.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

from rich.console import Console
from rich.table import Table

RATIO_KEYS = {"total": "total_ms", "downtime": "downtime_ms", "bytes": "bytes_sent"}
# The grid's ratios: also the guest-visible gap, the rounds and the bytes counted on the link,
# and livemig's downtime against QEMU's source STOP to destination RESUME (the same span: QEMU's
# own post-copy downtime ends before the destination runs).
GRID_RATIO_KEYS: dict[str, str | tuple[str, str]] = {
    "total": "total_ms", "downtime": "downtime_ms", "guest_gap": "guest_gap_ms",
    "bytes": "bytes_sent", "link_bytes": "link_bytes", "rounds": "rounds",
    "stop_to_resume": ("downtime_ms", "stop_to_resume_ms")}

# (label, key path, unit) of the rows printed in the table.
TABLE_ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("status", ("status",), ""),
    ("mode", ("mode",), ""),
    ("CPU model", ("cpu_model",), ""),
    ("total", ("total_ms",), "ms"),
    ("downtime", ("downtime_ms",), "ms"),
    ("guest gap", ("guest_gap_ms",), "ms"),
    ("setup", ("setup_ms",), "ms"),
    ("rounds", ("rounds",), ""),
    ("bytes sent", ("bytes_sent",), "MiB"),
    ("pages raw", ("pages", "raw"), ""),
    ("pages zero", ("pages", "zero"), ""),
]


def _is_number(v: object) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _median_value(values: list[Any]) -> Any:
    """Median of numbers (ints stay ints when the median is whole), else the most common."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(_is_number(v) for v in present):
        m = statistics.median(present)
        if all(isinstance(v, int) for v in present) and float(m).is_integer():
            return int(m)
        return float(m)
    if all(isinstance(v, Mapping) for v in present):
        return _median_mapping(present)
    try:
        return statistics.mode(present)
    except TypeError:  # unhashable, e.g. lists: keep the first
        return present[0]


def _median_mapping(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    keys: list[str] = []
    for r in runs:
        keys.extend(k for k in r if k not in keys)
    return {k: _median_value([r.get(k) for r in runs]) for k in keys}


def median_dict(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Key-wise median of result dicts from repeats of one scenario (nested dicts too).

    Numbers take the median over the runs that have them; other values (``mode``...) the most
    common one. ``status`` is "completed" only when every run completed, else the first other
    status. ``repeats`` is set to the number of runs.
    """
    if not runs:
        raise ValueError("no runs to take a median of")
    out = _median_mapping(runs)
    if "status" in out:
        statuses = [r.get("status") for r in runs]
        others = [s for s in statuses if s != "completed"]
        out["status"] = others[0] if others else "completed"
    out["repeats"] = len(runs)
    return out


def ratio(a: Any, b: Any) -> float | None:
    """a / b when both are numbers and b is non-zero, else None."""
    if not (_is_number(a) and _is_number(b)) or b == 0:
        return None
    return float(a) / float(b)


def ratios(livemig: Mapping[str, Any], qemu: Mapping[str, Any],
           keys: Mapping[str, str | tuple[str, str]] = RATIO_KEYS) -> dict[str, float | None]:
    """livemig / QEMU for total time, downtime and bytes on the wire (or the figures
    ``keys`` names: ratio name -> result key, or (livemig's key, QEMU's key))."""
    out: dict[str, float | None] = {}
    for name, key in keys.items():
        lk, qk = key if isinstance(key, tuple) else (key, key)
        out[name] = ratio(livemig.get(lk), qemu.get(qk))
    return out


def throughput(result: Mapping[str, Any]) -> float | None:
    """Migration throughput in bytes/s: ``bytes_sent`` over ``total_ms``.

    A result may give its own figure as ``bytes_per_s``, which is then used instead.
    """
    own = result.get("bytes_per_s")
    if _is_number(own):
        return float(own)
    total_ms = result.get("total_ms")
    if not _is_number(total_ms) or total_ms <= 0:
        return None
    b = result.get("bytes_sent")
    return float(b) * 1000.0 / float(total_ms) if _is_number(b) else None


def raw_copy_fraction(livemig: Mapping[str, Any], raw_copy_bytes_per_s: float | None,
                      ) -> float | None:
    """livemig's migration throughput as a fraction of the raw-copy yardstick (goal: >= 0.7)."""
    if raw_copy_bytes_per_s is None:
        return None
    return ratio(throughput(livemig), raw_copy_bytes_per_s)


def build_report(scenario: str, livemig: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                 qemu: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                 raw_copy_bytes_per_s: float | None = None,
                 ratio_keys: Mapping[str, str | tuple[str, str]] = RATIO_KEYS
                 ) -> dict[str, Any]:
    """The JSON-ready report of one scenario.

    ``livemig`` and ``qemu`` are one result dict each, or a list of repeats (their median is
    reported). ``raw_copy_bytes_per_s`` is the yardstick from `rawcopy.measure_raw_copy`;
    ``ratio_keys`` the figures compared (`RATIO_KEYS`, or `GRID_RATIO_KEYS` for the grid).
    """
    lm = median_dict(livemig) if not isinstance(livemig, Mapping) else dict(livemig)
    qm = median_dict(qemu) if not isinstance(qemu, Mapping) else dict(qemu)
    return {
        "scenario": scenario,
        "livemig": lm,
        "qemu": qm,
        "ratios": ratios(lm, qm, ratio_keys),
        "raw_copy_fraction": raw_copy_fraction(lm, raw_copy_bytes_per_s),
        "raw_copy_bytes_per_s": raw_copy_bytes_per_s,
        "livemig_bytes_per_s": throughput(lm),
    }


def report_json(report: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """A report (or a list of them) as indented JSON."""
    return json.dumps(report, indent=2, sort_keys=False)


def _get(d: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = d
    for k in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(k)
    return cur


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "MiB" and _is_number(v):
        return f"{v / (1 << 20):,.1f} MiB"
    if unit == "us" and _is_number(v):  # a figure in ms, shown in microseconds
        return f"{v * 1000:,.0f} us"
    if isinstance(v, float):
        return f"{v:,.1f}{' ' + unit if unit else ''}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}{' ' + unit if unit else ''}"
    return str(v)


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def report_table(report: Mapping[str, Any]) -> Table:
    """A rich table of one report: one row per figure, livemig | QEMU | ratio."""
    table = Table(title=f"scenario: {report.get('scenario', '?')}")
    table.add_column("figure")
    table.add_column("livemig", justify="right")
    table.add_column("QEMU", justify="right")
    table.add_column("livemig/QEMU", justify="right")
    lm, qm = report.get("livemig", {}), report.get("qemu", {})
    by_key = {key: name for name, key in RATIO_KEYS.items()}
    rats = report.get("ratios", {})
    for label, path, unit in TABLE_ROWS:
        a, b = _get(lm, path), _get(qm, path)
        if a is None and b is None:
            continue
        name = by_key.get(path[0]) if len(path) == 1 else None
        r = rats.get(name) if name in rats else ratio(a, b)
        table.add_row(label, _fmt(a, unit), _fmt(b, unit), _fmt_ratio(r))
    raw = report.get("raw_copy_bytes_per_s")
    if raw is not None:
        tp = report.get("livemig_bytes_per_s")
        frac = report.get("raw_copy_fraction")
        table.add_row("throughput", _fmt(tp, "MiB") + "/s", "", "")
        table.add_row("raw copy", _fmt(raw, "MiB") + "/s", "",
                      "-" if frac is None else f"{frac:.2f} of raw")
    return table


def print_report(report: Mapping[str, Any], console: Console | None = None) -> None:
    """Print one report as a rich table."""
    (console or Console()).print(report_table(report))


# --------------------------------------------------------------------------------------------
# The scenario grid
# --------------------------------------------------------------------------------------------

# (label, key path, unit, ratio name) of each scenario's rows in the grid table.
GRID_TABLE_ROWS: list[tuple[str, tuple[str, ...], str, str | None]] = [
    ("status", ("status",), "", None),
    ("total", ("total_ms",), "ms", "total"),
    ("downtime", ("downtime_ms",), "ms", "downtime"),
    ("stop to resume", ("stop_to_resume_ms",), "ms", "stop_to_resume"),
    ("guest gap", ("guest_gap_ms",), "ms", "guest_gap"),
    ("rounds", ("rounds",), "", "rounds"),
    ("bytes sent", ("bytes_sent",), "MiB", "bytes"),
    ("link bytes", ("link_bytes",), "MiB", "link_bytes"),
]

# Rows shown where a side post-copied: its fault figures (QEMU gives a count and the vCPU
# time blocked, not the latency: "n/a").
FAULT_TABLE_ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("mode", ("mode",), ""),
    ("faults", ("faults", "count"), ""),
    ("fault p50", ("faults", "latency_ms", "p50"), "us"),
    ("fault p99", ("faults", "latency_ms", "p99"), "us"),
    ("vCPU blocked", ("faults", "blocked_ms"), "ms"),
    ("pages pushed", ("faults", "pushed"), ""),
    ("pages pulled", ("faults", "pulled"), ""),
    ("last page at", ("faults", "last_page_ms"), "ms"),
]
POSTCOPY_MODES = ("postcopy", "hybrid")
ALWAYS_SHOWN = ("fault p50", "fault p99", "vCPU blocked")  # the goals' figures, even as n/a


# livemig's figure on a line named for QEMU's: its downtime is its stop to resume.
LIVEMIG_PATHS: dict[tuple[str, ...], tuple[str, ...]] = {("stop_to_resume_ms",): ("downtime_ms",)}


def _fmt_pages(side: Mapping[str, Any]) -> str | None:
    """Pages per codec, e.g. "raw 4,120, xbzrle 4,089" (QEMU: its normal/zero pages as raw/zero,
    and the pages its xbzrle cache encoded)."""
    pages = side.get("pages")
    if not isinstance(pages, Mapping):
        return None
    counts = {k: v for k, v in pages.items() if _is_number(v)}
    x = side.get("xbzrle")
    if isinstance(x, Mapping) and _is_number(x.get("pages")):
        counts["xbzrle"] = x["pages"]
    return ", ".join(f"{k} {int(v):,}" for k, v in counts.items()) or None


def _fault_lines(lm: Mapping[str, Any], qm: Mapping[str, Any]) -> list[tuple[str, str, str,
                                                                               str]]:
    """Fault figures of a row where either side post-copied; a figure a post-copying side does
    not measure is "n/a"."""
    sides = (lm, qm)
    if not any(side.get("mode") in POSTCOPY_MODES for side in sides):
        return []

    def cell(side: Mapping[str, Any], path: tuple[str, ...], unit: str) -> str:
        v = _get(side, path)
        if v is None and isinstance(side.get("faults"), Mapping):
            return "n/a"
        return _fmt(v, unit)
    return [(label, cell(lm, path, unit), cell(qm, path, unit), "")
            for label, path, unit in FAULT_TABLE_ROWS
            if label in ALWAYS_SHOWN or any(_get(side, path) is not None for side in sides)]


def _why(side: Mapping[str, Any]) -> str | None:
    err = side.get("error")
    if not err:
        return None
    return str(err)


def grid_table(grid: Mapping[str, Any]) -> Table:
    """One table for the grid: a row group per scenario, livemig | QEMU | livemig/QEMU.

    Each group shows the figures, throughput against the raw socket copy measured on the same
    network, and, where a side did not complete, why."""
    settings = grid.get("settings", {})
    reps = grid.get("rows", [])
    cpu = next((r["qemu"].get("cpu_model") for r in reps if r.get("qemu", {}).get("cpu_model")),
               None)
    version = next((r["qemu"].get("qemu_version") for r in reps
                    if r.get("qemu", {}).get("qemu_version")), None)
    title = (f"{grid.get('grid', 'precopy')}: hotset mem={_fmt(settings.get('mem'), 'MiB')} "
             f"wss={settings.get('wss')} vcpus={settings.get('vcpus')} "
             f"repeat={settings.get('repeat')} (medians)")
    caption = ", ".join(x for x in (f"QEMU {version}" if version else "",
                                    f"-cpu {cpu}" if cpu else "",
                                    "ratio < 1: livemig smaller") if x)
    table = Table(title=title, caption=caption)
    table.add_column("scenario", no_wrap=True)
    table.add_column("figure", no_wrap=True)
    table.add_column("livemig", justify="right")
    table.add_column("QEMU", justify="right")
    table.add_column("livemig/QEMU", justify="right")
    for n, rep in enumerate(reps):
        lm, qm = rep.get("livemig", {}), rep.get("qemu", {})
        rats = rep.get("ratios", {})
        lines: list[tuple[str, str, str, str]] = []
        for label, path, unit, rname in GRID_TABLE_ROWS:
            a, b = _get(lm, LIVEMIG_PATHS.get(path, path)), _get(qm, path)
            if a is None and b is None:
                continue
            r = rats.get(rname) if rname else None
            lines.append((label, _fmt(a, unit), _fmt(b, unit), _fmt_ratio(r)))
        lines += _fault_lines(lm, qm)
        pa, pb = _fmt_pages(lm), _fmt_pages(qm)
        if pa or pb:
            lines.append(("pages", pa or "-", pb or "-", ""))
        raw = rep.get("raw_copy_bytes_per_s")
        tp, qtp = rep.get("livemig_bytes_per_s"), rep.get("qemu_bytes_per_s")
        if tp is not None or qtp is not None:
            frac = rep.get("raw_copy_fraction")
            lines.append(("throughput", _fmt(tp, "MiB") + "/s" if tp is not None else "-",
                          _fmt(qtp, "MiB") + "/s" if qtp is not None else "-",
                          "-" if frac is None else f"{frac:.2f} of raw"))
        if raw is not None:
            lines.append(("raw copy", _fmt(raw, "MiB") + "/s", "", ""))
        loaded = rep.get("raw_copy_loaded_bytes_per_s")
        if loaded is not None:
            lf = rep.get("raw_copy_loaded_fraction")
            lines.append(("raw copy, guest running", _fmt(loaded, "MiB") + "/s", "",
                          "-" if lf is None else f"{lf:.2f} of it"))
        if raw is None and rep.get("raw_copy_error"):
            lines.append(("raw copy", str(rep["raw_copy_error"]), "", ""))
        for who, side in (("livemig", lm), ("QEMU", qm)):
            why = _why(side)
            if why:
                lines.append((f"{who}: why", why, "", ""))
        net = str(rep.get("network", ""))
        head = [str(rep.get("row", rep.get("scenario", "?"))),
                net.split(" (", 1)[0] if not net.startswith("cannot") else ""]
        for i, (label, a, b, r) in enumerate(lines):
            table.add_row(head[i] if i < len(head) else "", label, a, b, r,
                          end_section=(i == len(lines) - 1 and n < len(reps) - 1))
    return table


def grid_summary(grid: Mapping[str, Any]) -> Table:
    """One line per scenario: the ratios and the fraction of the raw copy."""
    table = Table(title="livemig / QEMU per scenario (ratio < 1: livemig smaller)")
    table.add_column("scenario", no_wrap=True)
    for name in ("total", "down", "stop-res", "gap", "bytes", "link B", "rounds"):
        table.add_column(name, justify="right")
    table.add_column("of raw", justify="right")
    table.add_column("of loaded raw", justify="right")
    for rep in grid.get("rows", []):
        rats = rep.get("ratios", {})
        fracs = (rep.get("raw_copy_fraction"), rep.get("raw_copy_loaded_fraction"))
        table.add_row(str(rep.get("row")), *(_fmt_ratio(rats.get(k)) for k in (
            "total", "downtime", "stop_to_resume", "guest_gap", "bytes", "link_bytes",
            "rounds")),
            *("-" if f is None else f"{f:.2f}" for f in fracs))
    return table


def goals_table(grid: Mapping[str, Any]) -> Table:
    """The issue's goals, each with the grid's value and whether it was met."""
    table = Table(title="goals (this run)")
    table.add_column("goal")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_column("", no_wrap=True)
    for g in grid.get("goals", []):
        v, met = g.get("value"), g.get("met")
        note = f" ({g['note']})" if g.get("note") else ""
        table.add_row(f"{g.get('goal')}{note}", "-" if v is None else f"{v:.2f}",
                      str(g.get("target")),
                      "not measured" if met is None else ("met" if met else "not met"))
    return table


def print_grid(grid: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the grid: the table with a group per scenario, the summary of ratios, and the
    goals."""
    # Into a file or a pipe, wide enough that the summary's ten columns are not cut.
    c = console or Console(width=None if sys.stdout.isatty() else 120)
    c.print(grid_table(grid))
    c.print(grid_summary(grid))
    if grid.get("goals"):
        c.print(goals_table(grid))
