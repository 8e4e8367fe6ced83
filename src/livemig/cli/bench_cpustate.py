"""`livemig bench cpu-state`: the thesis' Tables 5 and 6, measured on the ARMv8 board."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from livemig.bench import cpustate
from livemig.bench.cpustate_udp import SerialConsole
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


def write_outputs(report: dict[str, Any], out: str | None, name: str,
                  plot: Callable[[dict[str, Any], str], None]) -> list[str]:
    """Write DIR/name.json and DIR/name.png when `out` is given; the paths written."""
    if out is None:
        return []
    js, png = os.path.join(out, f"{name}.json"), os.path.join(out, f"{name}.png")
    with open(js, "w") as f:
        json.dump(report, f, indent=1)
    plot(report, png)
    return [js, png]


def out_dir(out: str | None) -> None:
    """Bad input: --out must be an existing directory (checked before anything runs)."""
    if out is not None and not os.path.isdir(out):
        raise click.BadParameter(f"{out} is not a directory", param_hint="--out")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _baud(baud: int) -> str:
    return f"{baud} baud serial model" if baud else "no serial model"


def print_udp_report(report: dict[str, Any], out: Console) -> None:
    """--transport udp: the thesis' interval and livemig's, per register count, and Table 6."""
    udp = report["udp"]
    t = Table(title=f"Table 5 over UDP: {report['vcpus']} vCPUs, median of {report['repeat']}",
              caption=f"ms; thesis = its Table 5; thesis interval = capture + console "
                      f"({_baud(udp['console_baud'])}) + sendto of "
                      f"{udp['datagram_bytes']} bytes; livemig = capture + send + adopt + ack",
              **STYLE)
    for col in ("regs", "thesis", "interval", "livemig", "capture", "print", "rtt", "adopt",
                "exact"):
        t.add_column(col, justify="right")
    for r in udp["rows"]:
        t.add_row(str(r["regs"]), _ms(r["thesis_table_ms"]), _ms(r["thesis_interval_ms"]),
                  _ms(r["livemig_ms"]), _ms(r["capture_ms"]), _ms(r["print_ms"]),
                  _ms(r["roundtrip_ms"]), _ms(r["adopt_ms"]), "yes" if r["adopted_exact"] else "NO")
    out.print(t)
    r34 = next((r for r in udp["rows"] if r["regs"] == 34), None)
    if r34:
        t = Table(title="Table 6 over UDP: runs of 34 registers per vCPU (ms)", **STYLE)
        for col in ("run", "thesis", "interval", "livemig"):
            t.add_column(col, justify="right")
        thesis = [ns / 1e6 for ns in cpustate.THESIS_TABLE6_NS]
        ours, lm = r34["thesis_interval_runs_ms"], r34["livemig_runs_ms"]
        for i in range(max(len(thesis), len(ours))):
            t.add_row(str(i + 1), _ms(thesis[i] if i < len(thesis) else None),
                      _ms(ours[i] if i < len(ours) else None), _ms(lm[i] if i < len(lm) else None))
        out.print(t)
    g = report["guest"]
    out.print(f"peer received {udp['peer_received']}; guest during the runs: "
              f"{g['heartbeats_during']} heartbeats, {g['failures']} failures, error: {g['error']}")


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Tables 5 (and 6, when 34 registers were measured) with the thesis' figures beside ours."""
    out = console or Console()
    if report["transport"] == "udp":
        print_udp_report(report, out)
        return
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
@click.option("--transport", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True,
              help="udp: the thesis' own interval (console + 200-byte datagram) beside "
                   "livemig's (adopted and acknowledged), one datagram each")
@click.option("--console-baud", type=click.IntRange(0, 10_000_000), default=115200,
              show_default=True, help="udp: speed of the serial console the thesis printed "
                                      "the registers on (0: no serial model)")
@click.option("--console", "console_path", default=os.devnull, show_default=True,
              help="udp: where the register lines are printed")
@click.option("--out", default=None, metavar="DIR", help="write cpu-state.json/.png here")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def cpu_state(arch: str, vcpus: int, regs_text: str, repeat: int, guest: str, mem: int,
              gap: float, peer_text: str | None, no_full_state: bool, transport: str,
              console_baud: int, console_path: str, out: str | None, as_json: bool) -> None:
    """Time pause, capture, send and adoption of N registers per vCPU (thesis Tables 5, 6)."""
    counts = _parse_regs(regs_text)
    peer = _parse_peer(peer_text)
    out_dir(out)
    config = MachineConfig(Arch(arch), mem << 20, vcpus, guest_image(guest, Arch(arch)),
                           GUEST_CMDLINE[guest])
    try:
        with open(console_path, "a") as sink:
            udp = SerialConsole(sink, console_baud) if transport == "udp" else None
            report = cpustate.run(config, counts, repeat=repeat, gap=gap, peer=peer,
                                  full_state=not no_full_state, udp_console=udp)
    except OSError as e:
        raise click.BadParameter(f"cannot write {console_path}: {e.strerror}",
                                 param_hint="--console") from None
    except cpustate.BenchError as e:
        raise click.ClickException(str(e)) from e
    files = write_outputs(report, out, "cpu-state", cpustate.plot)
    if as_json:
        click.echo(json.dumps(report))
    else:
        print_report(report)
        if files:
            Console().print(f"wrote {', '.join(files)}")
