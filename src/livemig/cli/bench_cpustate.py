"""`livemig bench cpu-state`: the thesis' Tables 5 and 6, measured on the ARMv8 board."""

from __future__ import annotations

import json
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from livemig.bench import cpustate
from livemig.contract import Arch, MachineConfig
from livemig.images import guest_image

# Compact tables: they fit 80 columns (pipes, CI logs).
STYLE: dict[str, Any] = {"box": box.SIMPLE_HEAD, "padding": (0, 0, 0, 1), "show_edge": False}
GUEST_CMDLINE = {"cpustate": "hb=50", "verify": "wss=16M rate=20000"}


def _parse_regs(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None
    if not counts:
        raise click.BadParameter("give at least one register count")
    for n in counts:
        if not 1 <= n <= len(cpustate.THESIS_ORDER):
            raise click.BadParameter(f"{n} is outside 1..{len(cpustate.THESIS_ORDER)}")
    return counts


def _parse_peer(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise click.BadParameter(f"--peer wants HOST:PORT, not {text!r}")
    return host, int(port)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Tables 5 (and 6, when 34 registers were measured) with the thesis' figures beside ours."""
    out = console or Console()
    t = Table(title=f"Table 5: CPU-state migration, {report['vcpus']} vCPUs, "
                    f"median of {report['repeat']} (thesis: {report['thesis_vcpus']} vCPUs)",
              caption="times in ms; ratio = livemig / thesis; xfer = send + adopt + ack; "
                      "adopt = at the destination; exact = destination holds the source's "
                      "values",
              **STYLE)
    for col in ("regs", "bytes", "thesis", "livemig", "ratio", "pause", "capture", "xfer",
                "adopt", "exact"):
        t.add_column(col, justify="right")
    rows = list(report["rows"])
    if report.get("full_state"):
        rows.append({**report["full_state"], "regs": "all"})
    for r in rows:
        t.add_row(str(r["regs"]), str(r["bytes"]), _ms(r["thesis_ms"]), _ms(r["median_ms"]),
                  _ratio(r["ratio"]), _ms(r["pause_ms"]), _ms(r["capture_ms"]),
                  _ms(r["transfer_ms"]), _ms(r["adopt_ms"]), "yes" if r["adopted_exact"] else "NO")
    out.print(t)
    t6 = report.get("table6")
    if t6:
        t = Table(title="Table 6: runs of 34 registers per vCPU (ms)", **STYLE)
        for col in ("run", "thesis", "livemig"):
            t.add_column(col, justify="right")
        thesis, ours = t6["thesis_runs_ms"], t6["runs_ms"]
        for i in range(max(len(thesis), len(ours))):
            t.add_row(str(i + 1), _ms(thesis[i] if i < len(thesis) else None),
                      _ms(ours[i] if i < len(ours) else None))
        t.add_row("median", _ms(t6["thesis_median_ms"]), _ms(t6["median_ms"]))
        out.print(t)
        out.print(f"Table 6 livemig/thesis: {_ratio(t6['ratio'])}")
    g = report["guest"]
    out.print(f"timed: {report['timed']} (the thesis timed capture + UDP send only); "
              f"register order SP, LR, PC, PSTATE, X0..X29; {report['transport']}; "
              f"full state row 'all': {report['full_state'] and report['full_state']['names']}")
    out.print(f"guest during the runs: {g['heartbeats_during']} heartbeats, "
              f"{g['failures']} failures, error: {g['error']}")


@click.command("cpu-state")
@click.option("--arch", type=click.Choice([Arch.ARM64.value]), default=Arch.ARM64.value,
              show_default=True, help="only the ARMv8 board, as in the thesis")
@click.option("--vcpus", type=click.IntRange(1, 4), default=2, show_default=True)
@click.option("--regs", "regs_text", default="4,8,12,17,20,34", show_default=True,
              help="register counts per vCPU (SP, LR, PC, PSTATE, X0..X29 order)")
@click.option("--repeat", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="trials per count (median reported); 10 at 34 registers = Table 6")
@click.option("--guest", type=click.Choice(sorted(GUEST_CMDLINE)), default="cpustate",
              show_default=True, help="running guest whose registers are migrated")
@click.option("--mem", default=64, type=click.IntRange(16, 4096), show_default=True,
              help="guest RAM in MiB")
@click.option("--gap", default=0.05, type=click.FloatRange(0, 10), show_default=True,
              help="seconds the guest runs between trials")
@click.option("--peer", "peer_text", default=None,
              help="HOST:PORT of a running `python -m livemig.bench.cpustate_peer` "
                   "[default: spawn one on loopback]")
@click.option("--no-full-state", is_flag=True, help="skip the full-state row")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def cpu_state(arch: str, vcpus: int, regs_text: str, repeat: int, guest: str, mem: int,
              gap: float, peer_text: str | None, no_full_state: bool, as_json: bool) -> None:
    """Time pause, capture, send and adoption of N registers per vCPU (thesis Tables 5, 6)."""
    counts = _parse_regs(regs_text)
    peer = _parse_peer(peer_text)
    config = MachineConfig(Arch(arch), mem << 20, vcpus, guest_image(guest, Arch(arch)),
                           GUEST_CMDLINE[guest])
    try:
        report = cpustate.run(config, counts, repeat=repeat, gap=gap, peer=peer,
                              full_state=not no_full_state)
    except cpustate.BenchError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(report))
    else:
        print_report(report)
