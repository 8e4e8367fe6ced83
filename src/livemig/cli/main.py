"""The `livemig` command."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from livemig import snapshot
from livemig.cli import (
    credential_cmds,
    migrate_cmds,
    netlab_cmds,
    template_cmds,
)
from livemig.cli.lazygroup import LazyGroup
from livemig.cli.options import (
    ARCH,
    CONTROL_HELP,
    NET,
    NET_HELP,
    SIZE,
    SIZE_HELP,
    NetSpec,
    random_mac,
)
from livemig.cli.process import host_machine, serve_machine
from livemig.cli.runner import build_machine, open_console, prepare_control_path
from livemig.contract import Arch, ImageError, MachineConfig, MachineError
from livemig.control import ControlError, request
from livemig.migration.credentials import CredentialError

EXIT_USAGE = 2

__all__ = ["cli", "main", "serve_machine"]  # serve_machine: kept importable from here


@click.group(cls=LazyGroup, lazy={"bench": "livemig.cli.bench_cmds:bench",
                                  "demo": "livemig.cli.demo:demo"})
def cli() -> None:
    """livemig: run machines and move them between hosts while they run."""


@cli.command()
@click.argument("image", required=False)
@click.option("--template", "template", default=None,
              help="start a clone of this template (RAM maps it copy-on-write) instead of IMAGE")
@click.option("--mem", type=SIZE, default="256M", show_default=True,
              help=f"guest RAM ({SIZE_HELP})")
@click.option("--vcpus", type=click.IntRange(1, 64), default=None, help="vCPUs [1]")
@click.option("--append", "cmdline", default="", help="guest command line, e.g. 'wss=100M'")
@click.option("--arch", type=ARCH, default="x86_64", show_default=True)
@click.option("--console", default="-", help="'-' (stdout), a file, unix:PATH or tcp:HOST:PORT")
@click.option("--control", default=None, help=CONTROL_HELP)
@click.option("--net", "nets", type=NET, multiple=True, help=NET_HELP)
def run(image: str | None, template: str | None, mem: int, vcpus: int | None, cmdline: str,
        arch: str, console: str, control: str | None, nets: tuple[NetSpec, ...]) -> None:
    """Run a machine in the foreground (IMAGE, or a clone of --template); Ctrl-C stops it."""
    if template is not None or image is None:
        if template is None or image is not None:
            raise click.UsageError("give either IMAGE or --template PATH")
        if nets:
            raise click.UsageError("--net is not available for a clone of a template yet")
        template_cmds.run_clone(template, vcpus, console, control)
        return
    vcpus = vcpus or 1
    if os.path.isdir(image):
        raise ImageError(f"guest image {image} is a directory")
    if not os.path.isfile(image):
        raise ImageError(f"guest image {image} does not exist")
    control = prepare_control_path(control)
    config = MachineConfig(Arch(arch), mem, vcpus, os.path.abspath(image), cmdline,
                           [n.mac or random_mac() for n in nets])
    sink, close = open_console(console)
    host_machine(build_machine(config, sink, [n.tap for n in nets]), control, close,
                 lambda m: None)


@cli.command()
@click.argument("socket_path", metavar="SOCKET")
@click.argument("command")
@click.argument("args", nargs=-1)
def ctl(socket_path: str, command: str, args: tuple[str, ...]) -> None:
    """Send COMMAND (status, pause, resume, save, quit, ...) to a machine; ARGS are key=value."""
    kw: dict[str, Any] = {}
    for a in args:
        key, eq, value = a.partition("=")
        if not eq:
            raise click.BadParameter(f"argument {a!r} is not key=value")
        kw[key] = _ctl_value(value)
    reply = request(socket_path, command, **kw)
    if not reply.get("ok"):
        click.echo(f"livemig: {command}: {_one_line(str(reply.get('error')))}", err=True)
        sys.exit(1)
    click.echo(json.dumps(reply, indent=2))


def _ctl_value(text: str) -> Any:
    """A `ctl` argument value: JSON if it parses as JSON (1, true, [1,2], "x"), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@cli.command()
@click.argument("socket_path", metavar="SOCKET")
@click.argument("file")
@click.option("--stop", is_flag=True, help="stop the machine once saved")
def save(socket_path: str, file: str, stop: bool) -> None:
    """Write RAM and state of a running machine to FILE (a new file: never overwritten)."""
    reply = request(socket_path, "save", timeout=600, path=os.path.abspath(file), stop=stop)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "save failed"))
    click.echo(f"saved {reply['bytes']} bytes to {reply['path']} "
               f"(guest paused {reply['paused_ms']} ms)")


@cli.command()
@click.argument("file")
@click.option("--console", default="-", help="'-' (stdout), a file, unix:PATH or tcp:HOST:PORT")
@click.option("--control", default=None, help=CONTROL_HELP)
@click.option("--net", "nets", type=NET, multiple=True,
              help="host TAP for each NIC of the machine: tap=NAME (repeatable)")
def restore(file: str, console: str, control: str | None, nets: tuple[NetSpec, ...]) -> None:
    """Resume a machine from a snapshot FILE, where it stopped."""
    if os.path.isdir(file):
        raise snapshot.SnapshotError(f"snapshot {file} is a directory")
    snap = snapshot.read(file)
    control = prepare_control_path(control)
    sink, close = open_console(console)
    taps = [n.tap for n in nets]
    machine = snapshot.restore(snap, lambda cfg: build_machine(cfg, sink, taps))
    host_machine(machine, control, close, lambda m: None)


for _module in (migrate_cmds, credential_cmds, netlab_cmds, template_cmds):
    _module.add_commands(cli)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main() -> None:
    """Entry point: bad input (usage, a file, a path, an address) prints one line and exits
    with status 2; a host resource failing prints one line and exits with 1; no traceback."""
    try:
        cli.main(prog_name="livemig", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as e:
        hint = f" (try '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"livemig: error: {_one_line(e.format_message())}{hint}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"livemig: error: {_one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except (MachineError, ControlError, CredentialError, ValueError) as e:
        click.echo(f"livemig: error: {_one_line(str(e))}", err=True)
        sys.exit(EXIT_USAGE)
    except OSError as e:  # a host resource failed (a file, a socket, a KVM ioctl): say which
        click.echo(f"livemig: error: {_one_line(str(e))}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
