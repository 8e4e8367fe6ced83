"""`livemig bench ...`: measured scenarios, compared with QEMU and a raw socket copy."""

from __future__ import annotations

import json
from typing import Any

import click

from livemig.bench import rawcopy, report
from livemig.bench.pair import AUTH_KINDS
from livemig.bench.qemu import QemuError, QemuMigrationConfig, run_qemu_migration
from livemig.bench.scenario import LivemigScenario, ScenarioError, run_livemig
from livemig.cli.bench_cpustate import cpu_state
from livemig.cli.options import SIZE
from livemig.images import guest_image


@click.group()
def bench() -> None:
    """Benchmarks: every figure measured the same way, baselines in the same run."""


bench.add_command(cpu_state)


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
def precopy(vs_qemu: bool, mem: int, wss: str, vcpus: int, repeat: int, max_downtime: float,
            auth: str, as_json: bool) -> None:
    """Pre-copy of a hotset guest: livemig, QEMU (--vs-qemu) and a raw copy, in one run."""
    cmdline = f"wss={wss}"
    say = (lambda _m: None) if as_json else (lambda m: click.echo(m, err=True))
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
    if as_json:
        click.echo(json.dumps(rep, default=str))
    else:
        report.print_report(rep)


def add_commands(cli: click.Group) -> None:
    cli.add_command(bench)
