"""`livemig bench essential-state` and `livemig bench cpu-load`: the ARM thesis' open questions.

Each prints a table (or, with --json, one JSON object) and, with --out DIR, writes
DIR/<name>.json and DIR/<name>.png.
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from livemig.bench import arm_cpuload, arm_essential
from livemig.cli.bench_cpustate import STYLE, out_dir, write_outputs
from livemig.contract import Arch, MachineConfig
from livemig.images import guest_image


def _names(text: str, what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise click.BadParameter(f"give at least one {what}")
    return names


def _emit(report: dict[str, Any], as_json: bool, table: Table, notes: list[str],
          files: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(report))
        return
    out = Console()
    out.print(table)
    for n in notes:
        out.print(n)
    if files:
        out.print(f"wrote {', '.join(files)}")


@click.command("essential-state")
@click.option("--guests", "guests_text", default="cpustate,idle", show_default=True,
              help=f"guests to migrate ({', '.join(arm_essential.GUESTS)})")
@click.option("--groups", "groups_text", default=",".join(arm_essential.GROUPS),
              show_default=True, help="state groups to leave out, one trial each")
@click.option("--vcpus", type=click.IntRange(1, 4), default=1, show_default=True)
@click.option("--mem", type=click.IntRange(16, 1024), default=32, show_default=True,
              help="guest RAM in MiB")
@click.option("--observe", type=click.FloatRange(0.2, 60), default=1.5, show_default=True,
              help="seconds the destination runs before it is judged")
@click.option("--repeat", type=click.IntRange(1, 50), default=3, show_default=True,
              help="trials per guest and group (each migrates at another moment)")
@click.option("--out", default=None, metavar="DIR", help="write essential-state.json/.png here")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def essential_state(guests_text: str, groups_text: str, vcpus: int, mem: int, observe: float,
                    repeat: int, out: str | None, as_json: bool) -> None:
    """Migrate running ARM guests leaving out one group of state at a time (thesis O6/O9)."""
    out_dir(out)
    guests = _names(guests_text, "guest")
    bad = [g for g in guests if g not in arm_essential.GUESTS]
    if bad:
        raise click.BadParameter(f"unknown guest {bad[0]!r}", param_hint="--guests")
    try:
        groups = arm_essential.check_groups(_names(groups_text, "group"))
    except arm_essential.EssentialError as e:
        raise click.BadParameter(str(e), param_hint="--groups") from None
    configs = {g: MachineConfig(Arch.ARM64, mem << 20, vcpus, guest_image(g, Arch.ARM64),
                                arm_essential.GUESTS[g]) for g in guests}
    try:
        report = arm_essential.run(configs, groups, observe, repeat)
    except arm_essential.EssentialError as e:
        raise click.ClickException(str(e)) from e
    files = write_outputs(report, out, "essential-state", arm_essential.plot)
    t = Table(title=f"Essential state: ARM guests migrated with one group left out "
                    f"({vcpus} vCPU, {repeat} trials, {observe:g} s observed)", **STYLE)
    t.add_column("left out", justify="left")
    for g in guests:
        t.add_column(g, justify="left")
    for grp in groups:
        t.add_row(grp, *[_cell(report["trials"], g, grp) for g in guests])
    _emit(report, as_json, t, ["left out = replaced by a fresh destination's own values; "
                               "RAM is always copied exactly"], files)


def _cell(trials: list[dict[str, Any]], guest: str, group: str) -> str:
    mine = [t for t in trials if t["guest"] == guest and t["group"] == group]
    worst, text = arm_essential.summary(mine)
    detail = next((t["detail"] for t in mine if t["outcome"] == worst and t["detail"]), "")
    return text + (f": {detail[:60]}" if detail else "")


@click.command("cpu-load")
@click.option("--seconds", type=click.FloatRange(0.5, 60), default=3.0, show_default=True,
              help="sampling time of each state")
@click.option("--mem", type=click.IntRange(16, 1024), default=64, show_default=True,
              help="guest RAM in MiB")
@click.option("--vcpus", type=click.IntRange(1, 4), default=2, show_default=True)
@click.option("--out", default=None, metavar="DIR", help="write cpu-load.json/.png here")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def cpu_load(seconds: float, mem: int, vcpus: int, out: str | None, as_json: bool) -> None:
    """Host CPU load per core in the thesis' four states (section 8.6)."""
    out_dir(out)
    try:
        report = arm_cpuload.run(seconds, mem << 20, vcpus)
    except arm_cpuload.LoadError as e:
        raise click.ClickException(str(e)) from e
    files = write_outputs(report, out, "cpu-load", arm_cpuload.plot)
    cores = report["cores"]
    t = Table(title=f"Host CPU load per core (%), ARM board, {vcpus} vCPUs, "
                    f"{seconds:g} s per state", **STYLE)
    for col in ("state", "s", *[f"cpu{c}" for c in range(cores)], "all",
                *[f"lm{c}" for c in range(cores)], "livemig", "src", "dst", "client", "hb/s"):
        t.add_column(col, justify="right" if col != "state" else "left")
    for s in report["states"]:
        by = s["by_process_pct"]
        t.add_row(s["state"], f"{s['seconds']:.1f}", *[f"{v:.0f}" for v in s["per_core_pct"]],
                  f"{s['host_pct']:.0f}", *[f"{v:.1f}" for v in s["livemig_per_core_pct"]],
                  f"{s['livemig_pct']:.1f}", *[f"{by[k]:.1f}" if k in by else "-" for k in
                                               ("source", "destination", "migrate client")],
                  "-" if s["heartbeats_per_s"] is None else f"{s['heartbeats_per_s']:.0f}")
    _emit(report, as_json, t, ["s = window; cpuN, all: the whole host's load (/proc/stat, "
                               "other work included); lmN: livemig's processes on core N; "
                               "livemig = src + dst + client, % of one core; hb/s: the guest's "
                               "heartbeats (board booted = guest paused; guest booted = idle; "
                               "running = cpustate)"], files)
