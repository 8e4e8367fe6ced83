"""`livemig bench ...`: measured scenarios, compared with QEMU and a raw socket copy."""

from __future__ import annotations

import click

from livemig.cli.bench_cpustate import cpu_state


@click.group()
def bench() -> None:
    """Benchmarks: every figure measured the same way, baselines in the same run."""


bench.add_command(cpu_state)


def add_commands(cli: click.Group) -> None:
    cli.add_command(bench)
