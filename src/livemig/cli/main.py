"""The `livemig` command."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from livemig import snapshot
from livemig.cli import bench_cmds, demo, migrate_cmds
from livemig.cli.options import ARCH, SIZE
from livemig.cli.process import host_machine, serve_machine
from livemig.cli.runner import build_machine, open_console
from livemig.contract import Arch, ImageError, MachineConfig, MachineError
from livemig.control import ControlError, request

EXIT_USAGE = 2

__all__ = ["cli", "main", "serve_machine"]  # serve_machine: kept importable from here


@click.group()
def cli() -> None:
    """livemig: run machines and move them between hosts while they run."""


@cli.command()
@click.argument("image")
@click.option("--mem", type=SIZE, default="256M", show_default=True, help="guest RAM")
@click.option("--vcpus", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--append", "cmdline", default="", help="guest command line, e.g. 'wss=100M'")
@click.option("--arch", type=ARCH, default="x86_64", show_default=True)
@click.option("--console", default="-", help="'-' (stdout), a file, unix:PATH or tcp:HOST:PORT")
@click.option("--control", default=None, help="control socket path [/tmp/livemig-PID.sock]")
def run(image: str, mem: int, vcpus: int, cmdline: str, arch: str, console: str,
        control: str | None) -> None:
    """Run a machine in the foreground; Ctrl-C stops it."""
    if not os.path.isfile(image):
        raise ImageError(f"guest image {image} does not exist")
    config = MachineConfig(Arch(arch), mem, vcpus, os.path.abspath(image), cmdline)
    sink, close = open_console(console)
    host_machine(build_machine(config, sink), control, close, lambda m: None)


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
        kw[key] = json.loads(value) if value[:1] in "[{0123456789tfn\"" else value
    reply = request(socket_path, command, **kw)
    click.echo(json.dumps(reply, indent=2))
    if not reply.get("ok"):
        sys.exit(1)


@cli.command()
@click.argument("socket_path", metavar="SOCKET")
@click.argument("file")
@click.option("--stop", is_flag=True, help="stop the machine once saved")
def save(socket_path: str, file: str, stop: bool) -> None:
    """Write RAM and state of a running machine to FILE."""
    reply = request(socket_path, "save", timeout=600, path=file, stop=stop)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "save failed"))
    click.echo(f"saved {reply['bytes']} bytes to {reply['path']} "
               f"(guest paused {reply['paused_ms']} ms)")


@cli.command()
@click.argument("file")
@click.option("--console", default="-", help="'-' (stdout), a file, unix:PATH or tcp:HOST:PORT")
@click.option("--control", default=None, help="control socket path [/tmp/livemig-PID.sock]")
def restore(file: str, console: str, control: str | None) -> None:
    """Resume a machine from a snapshot FILE, where it stopped."""
    snap = snapshot.read(file)
    sink, close = open_console(console)
    host_machine(build_machine(snap.config, sink), control, close,
                 lambda m: snapshot.restore_into(snap, m))


for _module in (migrate_cmds, demo, bench_cmds):
    _module.add_commands(cli)


def main() -> None:
    """Entry point: user errors print one line and exit with status 2, without a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (MachineError, ControlError) as e:
        click.echo(f"livemig: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except OSError as e:  # a host resource failed (a file, a socket, a KVM ioctl): say which
        click.echo(f"livemig: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
