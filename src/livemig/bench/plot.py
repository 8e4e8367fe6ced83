"""`--plot FILE.png`: per-round pages and bytes, and the send rate over time, of livemig runs.

Drawn from livemig's stats JSON (docs/stats.md): ``round_detail`` gives each round's pages
(per codec, summed here), bytes and duration; ``events`` places the rounds in time: the first
live round starts at ``setup-done``, each next one when the one before ended, and the last
(paused) round at ``paused``. The rate of a round is its bytes over its duration, drawn as a
step over the time the round took. One line per scenario; matplotlib's Agg backend, no display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MiB = float(1 << 20)


def round_series(result: Mapping[str, Any]) -> list[dict[str, float]]:
    """Each round of one livemig result: number, pages, bytes, start_ms, duration_ms, rate
    (bytes/s); [] when the result has no ``round_detail``."""
    detail = result.get("round_detail") or []
    events = {e.get("event"): float(e.get("t_ms", 0.0)) for e in result.get("events") or []
              if isinstance(e, Mapping)}
    t = events.get("setup-done", float(result.get("setup_ms") or 0.0))
    out = []
    for i, rd in enumerate(detail):
        pages = rd.get("pages") or {}
        npages = sum(pages.values()) if isinstance(pages, Mapping) else int(pages or 0)
        dur = float(rd.get("duration_ms") or 0.0)
        if i == len(detail) - 1 and "paused" in events and len(detail) > 1:
            t = max(t, events["paused"])
        nbytes = float(rd.get("bytes_sent") or 0)
        out.append({"number": float(rd.get("number", i + 1)), "pages": float(npages),
                    "bytes": nbytes, "start_ms": t, "duration_ms": dur,
                    "rate": nbytes / (dur / 1000.0) if dur > 0 else 0.0})
        t += dur
    return out


def livemig_runs(grid_or_report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(label, livemig result) to draw: the first run with rounds of every grid row, or the
    livemig side of a single report."""
    reports: Sequence[Mapping[str, Any]] = grid_or_report.get("rows") or [grid_or_report]
    out = []
    for rep in reports:
        runs = (rep.get("runs") or {}).get("livemig") or [rep.get("livemig") or {}]
        run = next((r for r in runs if r.get("round_detail")), None)
        if run is not None:
            out.append((str(rep.get("row") or rep.get("scenario") or "livemig"), run))
    return out


def plot_rounds(grid_or_report: Mapping[str, Any], path: str) -> int:
    """Write the PNG; returns how many livemig runs it draws (0: the page says there were
    none).

    Top: pages and bytes per round, a line per scenario (log scales; a round of 0 pages is left
    out). Below: the send rate over time, one small panel per scenario, each with its own
    scale (compressed rows send little), the guest's pause dotted.
    """
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [(label, result, round_series(result)) for label, result in livemig_runs(
        grid_or_report)]
    runs = [r for r in runs if r[2]]
    cols = 3
    nrate = max(1, math.ceil(len(runs) / cols))
    fig = plt.figure(figsize=(13, 4.5 + 2.6 * nrate))
    gs = fig.add_gridspec(1 + nrate, cols * 2, height_ratios=[1.7] + [1.0] * nrate)
    ax_pages = fig.add_subplot(gs[0, :cols])
    ax_bytes = fig.add_subplot(gs[0, cols:])
    fig.suptitle("livemig pre-copy: rounds and send rate")
    nan = float("nan")
    for i, (label, result, series) in enumerate(runs):
        nums = [r["number"] for r in series]
        (line,) = ax_pages.plot(nums, [r["pages"] if r["pages"] > 0 else nan for r in series],
                                marker="o", label=label)
        color = line.get_color()
        ax_bytes.plot(nums, [r["bytes"] / MiB if r["bytes"] > 0 else nan for r in series],
                      marker="o", color=color, label=label)
        ax = fig.add_subplot(gs[1 + i // cols, 2 * (i % cols):2 * (i % cols) + 2])
        xs: list[float] = []
        ys: list[float] = []
        for r in series:  # a flat step per round; nothing is sent between rounds
            end = r["start_ms"] + r["duration_ms"]
            xs += [r["start_ms"], r["start_ms"], end, end]
            ys += [0.0, r["rate"] / MiB, r["rate"] / MiB, 0.0]
        ax.fill_between(xs, ys, color=color, alpha=0.25, linewidth=0)
        ax.plot(xs, ys, color=color)
        for e in result.get("events") or []:
            if isinstance(e, Mapping) and e.get("event") == "paused":
                ax.axvline(float(e["t_ms"]), color="black", linestyle=":", linewidth=1)
                break
        ax.set_title(f"{label}: send rate", fontsize="medium")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("ms since start", fontsize="small")
        ax.set_ylabel("MiB/s", fontsize="small")
        ax.tick_params(labelsize="small")
        ax.grid(True, alpha=0.3)
    ax_pages.set(title="pages per round (all codecs)", xlabel="round", ylabel="pages",
                 yscale="log")
    ax_bytes.set(title="bytes sent per round (after the codecs)", xlabel="round",
                 ylabel="MiB", yscale="log")
    for ax in (ax_pages, ax_bytes):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    if runs:
        ax_bytes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax_pages.text(0.5, 0.5, "no livemig run with rounds to draw", ha="center",
                      va="center", transform=ax_pages.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(runs)
