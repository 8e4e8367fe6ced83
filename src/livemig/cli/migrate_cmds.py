"""Migration commands: `livemig listen` and `livemig migrate`. The control-socket side of a
migration (`migrate`, `query-migrate`, `migrate-cancel`) is in `migration_control`."""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any

import click

from livemig.cli.migration_control import outcome_line, register_migration_controls
from livemig.cli.options import CONTROL_HELP, RATE, BadInput, check_target
from livemig.cli.process import serve_machine
from livemig.cli.runner import (
    MachineHost,
    build_machine,
    open_console,
    preload_backends,
    prepare_control_path,
)
from livemig.contract import MachineConfig
from livemig.control import ControlError, request
from livemig.migration import (
    CommitUnconfirmed,
    MigrationError,
    MigrationStats,
    Mode,
    receive,
)
from livemig.migration.transport import listen

__all__ = ["add_commands", "listen_cmd", "migrate_cmd", "register_migration_controls"]


# -- livemig listen ---------------------------------------------------------------------------


def _receive_one(srv: socket.socket, console: str) -> tuple[Any, Any, MigrationStats] | None:
    """Accept one migration; None (after saying why) when it failed before COMMIT."""
    conn, peer = srv.accept()
    click.echo(f"livemig: incoming migration from {peer[0]}:{peer[1]}", err=True)
    sink, close = open_console(console)

    def build(cfg: MachineConfig) -> Any:
        return build_machine(cfg, sink)

    try:
        machine, stats = receive(conn, build)
    except CommitUnconfirmed as e:
        click.echo(f"livemig: {e}", err=True)
        return e.machine, close, MigrationStats(status="commit-unknown")  # type: ignore[attr-defined]
    except MigrationError as e:
        click.echo(f"livemig: migration refused: {e}", err=True)
        close()
        return None
    finally:
        conn.close()
    return machine, close, stats


@click.command("listen")
@click.option("--host", default="0.0.0.0", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), required=True, help="TCP port (0: any)")
@click.option("--console", default="-", help="'-' (stdout), a file, unix:PATH or tcp:HOST:PORT")
@click.option("--control", default=None, help=CONTROL_HELP)
@click.option("--once", is_flag=True, help="exit after a failed attempt instead of waiting again")
def listen_cmd(host: str, port: int, console: str, control: str | None, once: bool) -> None:
    """Wait for a machine to migrate in, then run it here with its own control socket."""
    control = prepare_control_path(control)
    preload_backends()
    try:
        srv = listen(host, port)
    except OSError as e:
        why = str(e.strerror or e).split(" (while attempting")[0]  # create_server's addition
        raise BadInput(f"cannot listen on {host}:{port}: {why}") from e
    h, p = srv.getsockname()[:2]
    click.echo(f"livemig: listening for a migration on {h}:{p}", err=True)
    got = None
    while got is None:
        got = _receive_one(srv, console)
        if got is None and once:
            sys.exit(1)
    srv.close()
    machine, close, stats = got
    mhost = MachineHost(machine, control, close)
    register_migration_controls(mhost)
    if stats.status == "completed":
        click.echo(f"livemig: migration received, machine running "
                   f"({stats.bytes_sent} bytes, {len(stats.rounds)} rounds)", err=True)
    serve_machine(mhost)


# -- livemig migrate --------------------------------------------------------------------------


def _show_table(stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"migration {stats['status']}", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    rows = [
        ("mode", stats["mode"]), ("total", f"{stats['total_ms']:.1f} ms"),
        ("setup", f"{stats['setup_ms']:.1f} ms"), ("downtime", f"{stats['downtime_ms']:.1f} ms"),
        ("guest-visible gap", "-" if stats["guest_gap_ms"] is None
         else f"{stats['guest_gap_ms']:.1f} ms"),
        ("rounds", str(stats["rounds"])), ("bytes sent", f"{stats['bytes_sent']:,}"),
        ("bandwidth", f"{stats['bandwidth'] / 1e6:.1f} MB/s"),
        ("dirty rate", f"{stats['dirty_rate']:.0f} pages/s"),
        ("throttle", f"{stats['throttle'] * 100:.0f} %"),
        ("verified memory", str(stats["verified_memory"])),
    ]
    rows += [(f"pages {k}", f"{v:,}") for k, v in stats["pages"].items()]
    for r in rows:
        t.add_row(*r)
    Console(stderr=True).print(t)


def _poll(socket_path: str, show: bool) -> dict[str, Any]:
    """Poll query-migrate until the migration ends; Ctrl-C cancels it."""
    from rich.progress import BarColumn, Progress, TextColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.fields[info]}"), disable=not show, transient=True)
    task = bar.add_task("setup", total=1, info="")
    with bar:
        while True:
            try:
                q = request(socket_path, "query-migrate")
            except ControlError as e:
                return {"status": "unknown", "stats": None,
                        "error": f"lost the source's control socket: {e}"}
            if q.get("status") not in ("setup", "active"):
                return q
            p = q.get("progress")
            if p:
                left = p["remaining_pages"] + p["round_pages_total"] - p["round_pages_done"]
                info = (f"remaining {left} pages  {p['bandwidth'] / 1e6:.0f} MB/s  "
                        f"throttle {p['throttle']:.0%}")
                bar.update(task, description=f"{p['phase']} {p['round']}",
                           total=max(p["round_pages_total"], 1),
                           completed=p["round_pages_done"], info=info)
            try:
                time.sleep(0.1)
            except KeyboardInterrupt:
                request(socket_path, "migrate-cancel")


@click.command("migrate")
@click.argument("socket_path", metavar="SOCKET")
@click.option("--to", "target", required=True, help="destination HOST:PORT (livemig listen)")
@click.option("--mode", type=click.Choice([m.value for m in Mode]), default="precopy",
              show_default=True)
@click.option("--max-downtime", "max_downtime", type=float, default=300.0, show_default=True,
              help="target downtime in ms")
@click.option("--max-bandwidth", "max_bandwidth", type=RATE, default=None,
              help="rate cap in bytes/s, e.g. 100M, 1G (1G = 2^30 bytes/s)")
@click.option("--max-rounds", "max_rounds", type=click.IntRange(1), default=30, show_default=True)
@click.option("--auto-converge", is_flag=True, help="throttle vCPUs when rounds stop shrinking")
@click.option("--verify-memory", is_flag=True, help="compare keyed hashes of every page")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def migrate_cmd(socket_path: str, target: str, mode: str, max_downtime: float,
                max_bandwidth: str | None, max_rounds: int, auto_converge: bool,
                verify_memory: bool, as_json: bool) -> None:
    """Migrate the machine behind control SOCKET to a `livemig listen` at HOST:PORT."""
    check_target(target)
    reply = request(socket_path, "migrate", to=target, mode=mode, max_downtime_ms=max_downtime,
                    max_bandwidth=max_bandwidth, max_rounds=max_rounds,
                    auto_converge=auto_converge, verify_memory=verify_memory)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "migrate failed"))
    q = _poll(socket_path, show=not as_json and sys.stderr.isatty())
    stats = q.get("stats") or {"status": q.get("status")}
    if as_json:
        # The documented summary first; then the detail (bandwidth, dirty rate, the
        # switch-over steps, each round) for whoever wants to look further.
        keys = ("status", "mode", "total_ms", "downtime_ms", "setup_ms", "rounds", "bytes_sent",
                "pages", "guest_gap_ms", "verified_memory", "throttle", "error", "bandwidth",
                "dirty_rate", "switchover_ms", "round_detail")
        click.echo(json.dumps({k: stats.get(k) for k in keys} | {"error": q.get("error")}))
    elif q.get("status") == "completed" and q.get("stats"):
        _show_table(stats)
    if q.get("status") != "completed":
        if not as_json:
            click.echo(f"livemig: {outcome_line(q)}", err=True)
        sys.exit(2 if q.get("connected") is False else 1)  # unreachable --to: bad input


def add_commands(cli: click.Group) -> None:
    """Add `listen` and `migrate` to the `livemig` command group."""
    cli.add_command(listen_cmd)
    cli.add_command(migrate_cmd)
