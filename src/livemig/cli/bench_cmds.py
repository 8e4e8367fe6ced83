"""`livemig bench ...`: measured scenarios, compared with QEMU and a raw socket copy."""

from __future__ import annotations

import json
import re
from typing import Any

import click

from livemig.bench import grid, rawcopy, report
from livemig.bench import postcopy as pcbench
from livemig.bench.pair import AUTH_KINDS
from livemig.bench.qemu import QemuError, QemuMigrationConfig, run_qemu_migration
from livemig.bench.scenario import LivemigScenario, ScenarioError, run_livemig
from livemig.cli.bench_arm import cpu_load, essential_state
from livemig.cli.bench_cpustate import cpu_state
from livemig.cli.options import SIZE, BadInput
from livemig.images import guest_image

LINK_RATE = re.compile(r"\d+(\.\d+)?[kmg]?bit", re.IGNORECASE)


@click.group()
def bench() -> None:
    """Benchmarks: every figure measured the same way, baselines in the same run."""


bench.add_command(cpu_state)
bench.add_command(essential_state)
bench.add_command(cpu_load)


def _line(who: str, i: int, n: int, r: dict[str, Any]) -> str:
    mib = (r.get("bytes_sent") or 0) / 2**20
    return (f"{who:8s} run {i}/{n}: {r.get('status')} total {r.get('total_ms', 0):.0f} ms, "
            f"downtime {r.get('downtime_ms', 0):.0f} ms, gap {r.get('guest_gap_ms') or 0:.0f} "
            f"ms, {mib:.1f} MiB, {r.get('rounds')} rounds")


@bench.command()
@click.option("--vs-qemu", is_flag=True, help="run QEMU's own migration on the same guest")
@click.option("--mem", type=SIZE, default="1G", show_default=True)
@click.option("--wss", default="100M", show_default=True, help="hotset working set")
@click.option("--vcpus", type=click.IntRange(1, 8), default=1, show_default=True)
@click.option("--repeat", type=click.IntRange(1, 50), default=1, show_default=True)
@click.option("--max-downtime", type=float, default=300.0, show_default=True, help="ms")
@click.option("--auth", type=click.Choice(AUTH_KINDS), default="psk", show_default=True,
              help="how livemig's two sides authenticate (tls: encrypted too)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--grid", "whole_grid", is_flag=True,
              help="the scenario grid, every row, livemig and QEMU on each")
@click.option("--rows", default=None, metavar="A,B,...",
              help=f"grid rows to run ({', '.join(grid.ROW_NAMES)})")
@click.option("--xbzrle-cache", type=SIZE, default="64M", show_default=True,
              help="grid: the xbzrle cache of both sides")
@click.option("--timeout", type=click.FloatRange(5, 3600), default=120.0, show_default=True,
              help="grid: seconds one migration may take before it is cancelled")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png",
              help="draw livemig's pages and bytes per round and its rate over time")
def precopy(vs_qemu: bool, mem: int, wss: str, vcpus: int, repeat: int, max_downtime: float,
            auth: str, as_json: bool, whole_grid: bool, rows: str | None, xbzrle_cache: int,
            timeout: float, plot_path: str | None) -> None:
    """Pre-copy of a hotset guest: livemig, QEMU (--vs-qemu) and a raw copy, in one run.

    With --grid (or --rows), the scenario grid: a row per configuration (streams, xbzrle,
    compression, auto-converge, idle guests, a shaped netns link), each run on both livemig
    and QEMU with the same guest and settings; a row that cannot run says why.
    """
    if rows is not None and whole_grid:
        raise BadInput("--grid runs every row; give --rows alone for a subset")
    if plot_path is not None and not plot_path.lower().endswith(".png"):
        raise BadInput(f"--plot writes a PNG: {plot_path!r} does not end in .png")
    say = (lambda _m: None) if as_json else (lambda m: click.echo(m, err=True))
    if whole_grid or rows is not None:
        try:
            names = grid.parse_rows(rows) if rows is not None else []
        except ValueError as e:
            raise BadInput(str(e)) from e
        settings = grid.GridSettings(mem=mem, wss=wss, vcpus=vcpus, repeat=repeat,
                                     max_downtime_ms=max_downtime, xbzrle_cache=xbzrle_cache,
                                     auth=auth, timeout_s=timeout)
        result = grid.run_grid(names, settings, say)
        _plot(result, plot_path, say)
        if as_json:
            click.echo(json.dumps(result, default=str))
        else:
            report.print_grid(result)
        return
    cmdline = f"wss={wss}"
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    raw: list[float] = []
    for i in range(1, repeat + 1):  # interleaved, so that noise hits every side alike
        try:
            r = run_livemig(LivemigScenario("hotset", str(mem), vcpus, cmdline, "precopy",
                                            ["--max-downtime", str(max_downtime)], auth=auth))
        except ScenarioError as e:
            raise click.ClickException(f"livemig scenario: {e}") from e
        ours.append(r)
        say(_line("livemig", i, repeat, r))
        if vs_qemu:
            try:
                q = run_qemu_migration(QemuMigrationConfig(
                    guest_image("hotset"), cmdline, mem, smp=vcpus,
                    downtime_limit_ms=int(max_downtime))).to_dict()
            except QemuError as e:
                raise click.ClickException(f"QEMU baseline: {e}") from e
            theirs.append(q)
            say(_line("qemu", i, repeat, q))
        raw.append(rawcopy.measure_raw_copy(mem, repeats=1).bytes_per_s)
        say(f"raw copy run {i}/{repeat}: {raw[-1] / 2**20:.0f} MiB/s")
    raw.sort()
    rep = report.build_report(f"precopy hotset mem={mem >> 20}M wss={wss} vcpus={vcpus} "
                              f"auth={auth}",
                              ours, theirs or [{}], raw[len(raw) // 2])
    _plot(rep, plot_path, say)
    if as_json:
        click.echo(json.dumps(rep, default=str))
    else:
        report.print_report(rep)


@bench.command()
@click.option("--vs-qemu", is_flag=True, help="run QEMU's postcopy-ram on the same guest")
@click.option("--link", default=None, metavar="RATE",
              help="run both over two netns joined by a veth pair shaped to RATE (1gbit)")
@click.option("--mem", type=SIZE, default="1G", show_default=True)
@click.option("--wss", default="100M", show_default=True, help="hotset working set")
@click.option("--vcpus", type=click.IntRange(1, 8), default=1, show_default=True)
@click.option("--repeat", type=click.IntRange(1, 50), default=1, show_default=True)
@click.option("--max-downtime", type=click.FloatRange(min=1),
              default=pcbench.DOWNTIME_LIMIT_MS, show_default=True,
              help="both sides' downtime limit, ms (low: neither ends pre-copy early)")
@click.option("--auth", type=click.Choice(AUTH_KINDS), default="psk", show_default=True,
              help="how livemig's two sides authenticate (tls: encrypted too)")
@click.option("--rows", default=None, metavar="A,B,...",
              help=f"rows to run ({', '.join(pcbench.ROW_NAMES)}; default: all)")
@click.option("--timeout", type=click.FloatRange(5, 3600), default=300.0, show_default=True,
              help="seconds one migration may take before it is cancelled")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def postcopy(vs_qemu: bool, link: str | None, mem: int, wss: str, vcpus: int, repeat: int,
             max_downtime: float, auth: str, rows: str | None, timeout: float,
             as_json: bool) -> None:
    """Post-copy of a hotset guest: livemig's --mode postcopy and --mode hybrid after 1 and 5
    rounds, against QEMU's postcopy-ram from the start and after the same rounds (--vs-qemu),
    in one run, on loopback or a shaped netns link (--link 1gbit).
    """
    if link is not None and not LINK_RATE.fullmatch(link):
        raise BadInput(f"--link takes a tc rate such as 1gbit or 500mbit, not {link!r}")
    try:
        names = grid.parse_rows(rows, pcbench.ROW_NAMES) if rows is not None else []
    except ValueError as e:
        raise BadInput(str(e)) from e
    say = (lambda _m: None) if as_json else (lambda m: click.echo(m, err=True))
    settings = grid.GridSettings(mem=mem, wss=wss, vcpus=vcpus, repeat=repeat,
                                 max_downtime_ms=max_downtime, auth=auth, timeout_s=timeout,
                                 vs_qemu=vs_qemu, raw_copy=False)
    result = pcbench.run_postcopy_bench(settings, link, names, say)
    if as_json:
        click.echo(json.dumps(result, default=str))
    else:
        report.print_grid(result)


@bench.command("net")
@click.option("--vs-qemu", is_flag=True, help="also migrate the same guest with QEMU")
@click.option("--mem", default="64M", show_default=True, help="guest RAM")
@click.option("--rate", type=click.FloatRange(1, 5000), default=500.0, show_default=True,
              help="UDP requests a second")
@click.option("--duration", type=click.FloatRange(2, 600), default=8.0, show_default=True,
              help="seconds of client load (the migration starts --migrate-at into it)")
@click.option("--migrate-at", type=click.FloatRange(0.5, 600), default=3.0, show_default=True)
@click.option("--auth", type=click.Choice(AUTH_KINDS), default="psk", show_default=True)
@click.option("--repeat", type=click.IntRange(1, 20), default=1, show_default=True,
              help="runs of each configuration, interleaved")
@click.option("--link", default="20mbit", show_default=True, metavar="RATE|none",
              help="shape every host's link to the switch (tc tbf rate): an edge site's "
              "uplink, on which a migration's switch-over lasts long enough to be seen")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def net(vs_qemu: bool, mem: str, rate: float, duration: float, migrate_at: float, auth: str,
        repeat: int, link: str | None, as_json: bool) -> None:
    """A netserve guest migrated while a client sends UDP requests and pings it: livemig with
    soft handover, livemig announcing only, and QEMU (--vs-qemu), in one network lab."""
    from livemig.bench import netbench
    from livemig.bench.netns import NetworkError

    if migrate_at >= duration:
        raise BadInput("--migrate-at must fall inside --duration")
    s = netbench.NetBenchSettings(mem=mem, rate=rate, duration=duration,
                                  migrate_at=migrate_at, auth=auth, repeat=repeat,
                                  link=None if link == "none" else link)
    say = (lambda _m: None) if as_json else (lambda m: click.echo(m, err=True))
    try:
        result = netbench.run_bench(s, vs_qemu, say)
    except NetworkError as e:
        raise BadInput(f"network lab: {e}") from e
    if as_json:
        click.echo(json.dumps(result, default=str))
    else:
        netbench.print_report(result)


def _plot(result: dict[str, Any], path: str | None, say: Any) -> None:
    if path is None:
        return
    from livemig.bench.plot import plot_rounds

    try:
        n = plot_rounds(result, path)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"--plot {path}: {e}") from e
    say(f"plot: {path} ({n} livemig run{'s' if n != 1 else ''})")


def _counts(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError as e:
        raise BadInput(f"expected numbers separated by commas, got {text!r}") from e
    if not out or any(not 1 <= n <= 32 for n in out):
        raise BadInput(f"counts must be 1..32, got {text!r}")
    return out


def _png(path: str | None) -> None:
    if path is not None and not path.lower().endswith(".png"):
        raise BadInput(f"--plot writes a PNG: {path!r} does not end in .png")


@bench.command("templates")
@click.option("--clones", "counts", default="1,2,4,8", show_default=True,
              help="numbers of clones migrated at once")
@click.option("--mem", default="512M", show_default=True, help="RAM of each clone")
@click.option("--fill", default="300M", show_default=True, help="data in the template")
@click.option("--touch", type=click.IntRange(1), default=200, show_default=True,
              help="pages a second a busy clone writes")
@click.option("--touchset", default="16M", show_default=True,
              help="the busy clones' working set, where they write")
@click.option("--vs-qemu", is_flag=True, help="also QEMU migrating N ordinary guests of the "
              "same size and data at once")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--json-file", default=None, help="also write the JSON object to this file")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png")
def templates_bench(counts: str, mem: str, fill: str, touch: int, touchset: str,
                    vs_qemu: bool, as_json: bool, json_file: str | None,
                    plot_path: str | None) -> None:
    """N clones of one template migrated at once: TLM against generic pre-copy (idle clones,
    and busy ones writing --touch pages a second within --touchset)."""
    from livemig.bench.clones import ClonesSettings, plot_clones, print_clones, run_clones_bench

    _png(plot_path)
    say = (lambda _m: None) if as_json else (lambda m: click.echo(m, err=True))
    s = ClonesSettings(_counts(counts), mem, fill,
                       {"idle": "", "busy": f"touch={touch} touchset={touchset}"}, vs_qemu)
    result = run_clones_bench(s, say)
    if plot_path:
        plot_clones(result, plot_path)
        say(f"plot: {plot_path}")
    _emit(result, as_json, json_file, print_clones)


@bench.command("local")
@click.option("--sizes", default="1G,4G", show_default=True, help="machine sizes")
@click.option("--touch", type=click.IntRange(1), default=5000, show_default=True,
              help="pages a second a busy machine writes")
@click.option("--repeat", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option("--vs-qemu", is_flag=True, help="also QEMU with x-ignore-shared on a shared "
              "memory backend, same guest")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--json-file", default=None, help="also write the JSON object to this file")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png")
def local_bench(sizes: str, touch: int, repeat: int, vs_qemu: bool, as_json: bool,
                json_file: str | None, plot_path: str | None) -> None:
    """Same-host handover (RAM passed as memfds) against pre-copy over loopback TCP, idle and
    busy, with the host's memory at five moments."""
    from livemig.bench.local import LocalSettings, plot_local, print_local, run_local_bench
    from livemig.units import parse_size

    _png(plot_path)
    names = [x.strip() for x in sizes.split(",") if x.strip()]
    try:
        for n in names:
            parse_size(n)
    except ValueError as e:
        raise BadInput(f"--sizes: {e}") from e
    say = (lambda _m: None) if as_json else (lambda m: click.echo(m, err=True))
    result = run_local_bench(LocalSettings(names, {"idle": 0, "busy": touch}, repeat, vs_qemu),
                             say)
    if plot_path:
        plot_local(result, plot_path)
        say(f"plot: {plot_path}")
    _emit(result, as_json, json_file, print_local)


def _emit(result: dict[str, Any], as_json: bool, json_file: str | None, table: Any) -> None:
    if json_file is not None:
        with open(json_file, "w") as f:
            json.dump(result, f, default=str)
    if as_json:
        click.echo(json.dumps(result, default=str))
    else:
        table(result)

