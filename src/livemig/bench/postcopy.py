"""`livemig bench postcopy`: livemig's post-copy and hybrid against QEMU's postcopy-ram.

Three rows, run on the same hotset guest and network, each `repeat` times, livemig and QEMU
interleaved (`grid.run_row`):

- ``postcopy``: ``--mode postcopy`` vs postcopy-ram with `migrate-start-postcopy` sent right
  after `migrate` (QEMU starts post-copy on its first iteration);
- ``hybrid-1`` / ``hybrid-5``: ``--mode hybrid --postcopy-after N`` vs postcopy-ram with
  `migrate-start-postcopy` sent once N pre-copy rounds are done (``ram.dirty-sync-count``
  reaches N + 1), as libvirt's ``--postcopy-after-precopy`` does after the first.

Both sides run with the same downtime limit, 1 ms by default (``--max-downtime``): QEMU
completes as plain pre-copy whenever what is left fits its limit, before it looks at the
post-copy request, and livemig's hybrid switches early once what is left fits its limit
("converged"); at 1 ms neither does, and both switch after the rounds asked for (livemig's
hybrid still switches early when rounds stop shrinking: its ``rounds`` and ``stop_reason``
say so). A QEMU run that completed as pre-copy all the same is left out of QEMU's medians
(``precopy_runs`` counts them); when every run did, the row's goal is not measured.

Figures: livemig's from `migrate --json` (``total_ms`` up to the last page's arrival,
``faults`` with latency percentiles and vCPU time blocked); QEMU's from the source's
``query-migrate`` (``total-time``, ``downtime``, ``ram.postcopy-requests`` as the fault count)
and the destination's ``postcopy-blocktime``; QEMU does not measure fault latency. QEMU's own
post-copy ``downtime`` ends once the source has sent the device state, before the
destination runs: livemig's matching span is ``state_sent_ms`` (pause to STATE sent), and
the ``state_sent`` ratio compares those two. ``stop_to_resume_ms`` (source STOP to destination
RESUME events) is the span livemig's ``downtime_ms`` covers: the pause the guest sees. The
hybrid goals are checked both ways.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from livemig.bench.grid import Goal, GridSettings, Row, check_goals, run_rows
from livemig.bench.report import GRID_RATIO_KEYS, median_dict, ratio, ratios

DOWNTIME_LIMIT_MS = 1.0  # both sides' default (see above)
ROUNDS = (1, 5)  # the hybrid rows: post-copy after this many pre-copy rounds
ROW_NAMES = ("postcopy", *(f"hybrid-{n}" for n in ROUNDS))
FAULT_P50_GOAL_MS = 0.2


def postcopy_rows(link: str | None = None) -> list[Row]:
    """The bench's rows, on the host's loopback (``link`` None) or a shaped netns link."""
    where = f", {link} netns link" if link else ""
    rows = [Row("postcopy", f"--mode postcopy vs postcopy-ram from the start{where}",
                qemu={"postcopy_after": 0},
                mode="postcopy", link=link)]
    for n in ROUNDS:
        rows.append(Row(f"hybrid-{n}", f"--mode hybrid --postcopy-after {n} vs postcopy-ram "
                        f"after {n} round{'s' if n > 1 else ''}{where}",
                        ("--postcopy-after", str(n)),
                        {"postcopy_after": n},
                        mode="hybrid", link=link))
    return rows


def postcopy_goals(link: str | None = None) -> list[Goal]:
    """The issue's goals (issue 10); the fault latency goal is for loopback only."""
    goals: list[Goal] = [("postcopy", "total", "<=", 1.0,
                          "post-copy total <= 1.0x QEMU's post-copy")]
    for n in ROUNDS:
        goals += [(f"hybrid-{n}", "state_sent", "<=", 1.0,
                   f"hybrid (after {n}) pause to state sent <= QEMU's own figure (same span)"),
                  (f"hybrid-{n}", "stop_to_resume", "<=", 1.0,
                   f"hybrid (after {n}) downtime <= QEMU's postcopy after {n} (QEMU: source "
                   "STOP to destination RESUME)")]
    if link is None:
        goals.append(("postcopy", "livemig.faults.latency_ms.p50", "<=", FAULT_P50_GOAL_MS,
                      "post-copy fault latency p50 <= 0.2 ms on loopback"))
    return goals


def run_postcopy_bench(s: GridSettings, link: str | None = None,
                       names: Sequence[str] = (),
                       say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run the named rows (all when empty); the JSON-ready result with the goals checked."""
    rows = [r for r in postcopy_rows(link) if not names or r.name in names]
    result = run_rows("postcopy", rows, s, postcopy_goals(link), say)
    result["settings"]["link"] = link
    for rep in result["rows"]:
        only_postcopy_runs(rep)
        state_sent_ratio(rep)
    result["goals"] = check_goals(result["rows"], postcopy_goals(link))
    compared_with_postcopy(result)
    return result


def only_postcopy_runs(rep: dict[str, Any]) -> None:
    """QEMU's medians over the runs that post-copied, when some completed as pre-copy."""
    runs = rep.get("runs", {}).get("qemu", [])
    pc = [r for r in runs if r.get("mode") == "postcopy"]
    if not pc or len(pc) == len(runs):
        return
    rep["qemu"] = median_dict(pc)
    rep["qemu"]["precopy_runs"] = len(runs) - len(pc)
    rep["ratios"] = ratios(rep["livemig"], rep["qemu"], GRID_RATIO_KEYS)


def state_sent_ratio(rep: dict[str, Any]) -> None:
    """The like-for-like pair for QEMU's own figure: livemig's pause to STATE sent over QEMU's
    post-copy downtime, which also ends once the source has sent the device state."""
    rep.setdefault("ratios", {})["state_sent"] = ratio(
        rep.get("livemig", {}).get("state_sent_ms"), rep.get("qemu", {}).get("downtime_ms"))


def compared_with_postcopy(result: dict[str, Any]) -> None:
    """A goal comparing with QEMU is not measured where QEMU did not post-copy (it completed
    as pre-copy before the switch), and says how many of QEMU's runs were left out."""
    by_row = {r.get("row"): r for r in result["rows"]}
    for g in result["goals"]:
        rep = by_row.get(g["row"]) or {}
        if g["figure"] not in rep.get("ratios", {}):
            continue
        qm = rep.get("qemu", {})
        if g["met"] is not None and qm.get("mode") != "postcopy":
            g["met"] = None
            g["note"] = f"QEMU completed as {qm.get('mode')}, not post-copy"
        elif qm.get("precopy_runs"):
            g["note"] = (f"{qm['precopy_runs']} of {qm['repeats'] + qm['precopy_runs']} QEMU "
                         "runs completed as pre-copy, left out")
