"""`livemig bench postcopy`: livemig's post-copy and hybrid against QEMU's postcopy-ram.

Three rows, run on the same hotset guest and network, each `repeat` times, livemig and QEMU
interleaved (`grid.run_row`):

- ``postcopy``: ``--mode postcopy`` vs postcopy-ram with `migrate-start-postcopy` sent right
  after `migrate` (QEMU starts post-copy on its first iteration);
- ``hybrid-1`` / ``hybrid-5``: ``--mode hybrid --postcopy-after N`` vs postcopy-ram with
  `migrate-start-postcopy` sent once N pre-copy rounds are done (``ram.dirty-sync-count``
  reaches N + 1), as libvirt's ``--postcopy-after-precopy`` does after the first.

QEMU's side runs with a 1 ms downtime limit: QEMU completes as plain pre-copy whenever what is
left fits its limit, before it looks at the post-copy request, whereas livemig's hybrid always
switches; with the limit at 1 ms a QEMU row is a post-copy unless the guest dirties almost
nothing (each QEMU result says its ``mode``). livemig keeps ``--max-downtime`` (its hybrid
ignores it once it has been told after how many rounds to switch, apart from ending pre-copy
early when rounds stop shrinking; ``rounds`` and ``stop_reason`` say so).

Figures: livemig's from `migrate --json` (``total_ms`` up to the last page's arrival,
``faults`` with latency percentiles and vCPU time blocked); QEMU's from the source's
``query-migrate`` (``total-time``, ``downtime``, ``ram.postcopy-requests`` as the fault count)
and the destination's ``postcopy-blocktime``; QEMU does not measure fault latency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from livemig.bench.grid import Goal, GridSettings, Row, run_rows

QEMU_DOWNTIME_LIMIT_MS = 1
ROUNDS = (1, 5)  # the hybrid rows: post-copy after this many pre-copy rounds
ROW_NAMES = ("postcopy", *(f"hybrid-{n}" for n in ROUNDS))
FAULT_P50_GOAL_MS = 0.2


def postcopy_rows(link: str | None = None) -> list[Row]:
    """The bench's rows, on the host's loopback (``link`` None) or a shaped netns link."""
    where = f", {link} netns link" if link else ""
    rows = [Row("postcopy", f"--mode postcopy vs postcopy-ram from the start{where}",
                qemu={"postcopy_after": 0, "downtime_limit_ms": QEMU_DOWNTIME_LIMIT_MS},
                mode="postcopy", link=link)]
    for n in ROUNDS:
        rows.append(Row(f"hybrid-{n}", f"--mode hybrid --postcopy-after {n} vs postcopy-ram "
                        f"after {n} round{'s' if n > 1 else ''}{where}",
                        ("--postcopy-after", str(n)),
                        {"postcopy_after": n, "downtime_limit_ms": QEMU_DOWNTIME_LIMIT_MS},
                        mode="hybrid", link=link))
    return rows


def postcopy_goals(link: str | None = None) -> list[Goal]:
    """The issue's goals (issue 10); the fault latency goal is for loopback only."""
    goals: list[Goal] = [("postcopy", "total", "<=", 1.0,
                          "post-copy total <= 1.0x QEMU's post-copy")]
    goals += [(f"hybrid-{n}", "downtime", "<=", 1.0,
               f"hybrid (after {n}) downtime <= QEMU's postcopy after {n}") for n in ROUNDS]
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
    _compared_with_postcopy(result)
    return result


def _compared_with_postcopy(result: dict[str, Any]) -> None:
    """A goal comparing with QEMU is not measured where QEMU did not post-copy (it completed
    as pre-copy before the switch): the goal's ``note`` says so."""
    by_row = {r.get("row"): r for r in result["rows"]}
    for g in result["goals"]:
        rep = by_row.get(g["row"]) or {}
        mode = rep.get("qemu", {}).get("mode")
        if g["figure"] in rep.get("ratios", {}) and g["met"] is not None and mode != "postcopy":
            g["met"] = None
            g["note"] = f"QEMU completed as {mode}, not post-copy"
