"""Machine-process assembly: a started machine, its control socket with the migration
controls, served until the machine ends. `run`, `restore` and `listen` all end up here."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from livemig.cli.migration_control import register_migration_controls
from livemig.cli.runner import MachineHost, default_control_path
from livemig.contract import Machine


def serve_machine(host: MachineHost, quiet: bool = False) -> None:
    if not quiet:
        click.echo(f"livemig: control socket {host.control.path}", err=True)
    reason = host.serve()
    if not quiet:
        click.echo(f"livemig: machine ended: {reason}", err=True)
    if reason.startswith("guest stopped"):
        sys.exit(1)


def host_machine(machine: Machine, control: str | None, close_console: Callable[[], None],
                 prepare: Callable[[Machine], None]) -> None:
    """Prepare and start a new machine, then serve its control socket until it ends; the
    machine is closed whatever goes wrong on the way."""
    try:
        prepare(machine)
        machine.start()
        host = MachineHost(machine, control or default_control_path(), close_console)
        register_migration_controls(host)
    except BaseException:
        machine.close()
        raise
    serve_machine(host)
