"""Migration commands: `livemig listen` and `livemig migrate`. The control-socket side of a
migration (`migrate`, `query-migrate`, `migrate-cancel`) is in `migration_control`."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from livemig.cli.migration_control import outcome_line, register_migration_controls
from livemig.cli.options import (
    CONTROL_HELP,
    NET,
    RATE,
    SIZE,
    BadInput,
    NetSpec,
    check_target,
)
from livemig.cli.process import serve_machine
from livemig.cli.runner import (
    MachineHost,
    build_machine,
    open_console,
    preload_backends,
    prepare_control_path,
)
from livemig.cli.security_opts import build_security, security_options, security_request
from livemig.contract import MachineConfig
from livemig.control import ControlError, request
from livemig.migration import Mode
from livemig.migration.errors import InternalError
from livemig.migration.listener import Listener
from livemig.migration.transport import Address, AddressError, bind
from livemig.ram import host_available_bytes
from livemig.rampool import PoolError, RamPool

__all__ = ["add_commands", "listen_cmd", "migrate_cmd", "register_migration_controls"]


# -- livemig listen ---------------------------------------------------------------------------


LINGER_AFTER_DISCARD = 15.0  # seconds `listen --once` stays to answer a resolve question


class _Consoles:
    """The console of the machine being received (one at a time), opened when it is built."""

    def __init__(self, spec: str, taps: list[str]) -> None:
        self.spec = spec
        self.taps = taps
        self.close: Any = lambda: None

    def build(self, cfg: MachineConfig) -> Any:
        sink, self.close = open_console(self.spec)
        return build_machine(cfg, sink, self.taps)


def _ram_pool(size: int | None) -> RamPool | None:
    """The RAM of `listen --prealloc`, allocated now; BadInput when the host cannot give it."""
    if size is None:
        return None
    if size <= 0:
        raise BadInput("--prealloc must be positive")
    avail = host_available_bytes()
    if size > avail:
        raise BadInput(f"--prealloc {size >> 20} MiB: this host can give {avail >> 20} MiB")
    pool = RamPool(size)
    try:
        pool.fill()
    except PoolError as e:
        raise BadInput(f"--prealloc: {e.strerror}") from e
    kind = "2 MiB pages" if pool.huge else "4 KiB pages"
    click.echo(f"livemig: {size >> 20} MiB of RAM allocated ahead in {pool.fill_s:.2f} s "
               f"({kind})", err=True)
    return pool


def _address(host: str, port: int | None, unix: str | None) -> Address:
    if unix:
        return Address(path=unix)
    if port is None:
        raise BadInput("listen needs --port (or --unix PATH)")
    return Address(host, port)


@click.command("listen")
@click.option("--host", default="0.0.0.0", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="TCP port (0: any)")
@click.option("--unix", default=None, help="listen on a unix socket at this path instead")
@click.option("--console", default="-", help="'-' (stdout), a file, unix:PATH or tcp:HOST:PORT")
@click.option("--control", default=None, help=CONTROL_HELP)
@click.option("--once", is_flag=True, help="exit after a failed attempt instead of waiting again")
@click.option("--net", "nets", type=NET, multiple=True,
              help="host TAP for each NIC of the incoming machine: tap=NAME (repeatable)")
@click.option("--templates", "templates_dir", default=None,
              help="directory of templates held here: a clone of one of them migrates in "
              "sending only its own pages (--mode tlm)")
@click.option("--prealloc", type=SIZE, default=None,
              help="allocate this much RAM before listening (like QEMU's -mem-prealloc): a "
              "pre-copy or stop-and-copy of a machine that fits fills it without allocating")
@security_options
def listen_cmd(host: str, port: int | None, unix: str | None, console: str,
               control: str | None, once: bool, nets: tuple[NetSpec, ...],
               templates_dir: str | None, prealloc: int | None,
               key_file: str | None, tls_dir: str | None, insecure: bool) -> None:
    """Wait for a machine to migrate in, then run it here with its own control socket."""
    if templates_dir is not None and not os.path.isdir(templates_dir):
        raise BadInput(f"--templates {templates_dir}: not a directory")
    control = prepare_control_path(control)
    sec = build_security(key_file, tls_dir, insecure)
    addr = _address(host, port, unix)
    preload_backends()
    pool = _ram_pool(prealloc)
    try:
        srv = bind(addr)
    except AddressError as e:
        raise BadInput(str(e).split(" (while attempting")[0]) from e
    where = f"unix:{addr.path}" if addr.is_unix else "{}:{}".format(*srv.getsockname()[:2])
    consoles = _Consoles(console, [n.tap for n in nets])
    lst = Listener(srv, sec, consoles.build, log=lambda m: click.echo(f"livemig: {m}", err=True),
                   templates_dir=templates_dir and os.path.abspath(templates_dir), ram_pool=pool)
    sound, bad = lst.check_templates()  # before taking migrations: none waits for the hashes
    click.echo(f"livemig: listening for a migration on {where}", err=True)
    if templates_dir is not None:
        for why in bad:
            click.echo(f"livemig: {why}", err=True)
        click.echo(f"livemig: {sound} sound template(s) in {templates_dir}", err=True)
    lst.start()
    try:
        while (inc := lst.results.get()).machine is None:
            consoles.close()
            detail = f" ({inc.error.detail})" if isinstance(inc.error, InternalError) else ""
            click.echo(f"livemig: migration from {inc.peer} refused: {inc.error}{detail}",
                       err=True)
            if once:
                if inc.stats.status == "discarded":
                    time.sleep(LINGER_AFTER_DISCARD)  # the source may ask what happened
                sys.exit(1)
        mhost = MachineHost(inc.machine, control, consoles.close)
        register_migration_controls(mhost)
        click.echo(f"livemig: migration received, machine running ({inc.stats.bytes_sent} "
                   f"bytes, {len(inc.stats.rounds)} rounds, {inc.stats.security})", err=True)
        serve_machine(mhost)  # the listener stays up meanwhile, to answer resolve questions
    finally:
        lst.close()


# -- livemig migrate --------------------------------------------------------------------------


def _show_table(stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"migration {stats['status']}", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    rows = [
        ("mode", stats["mode"]), ("security", stats.get("security", "-")),
        ("stopped iterating", stats.get("stop_reason") or "-"),
        ("total", f"{stats['total_ms']:.1f} ms"),
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
    f = stats.get("faults") or {}
    if f.get("pushed") or f.get("pulled") or f.get("count"):
        lat = f.get("latency_ms") or {}
        rows += [("post-copy pages pushed / pulled", f"{f['pushed']:,} / {f['pulled']:,}"),
                 ("faults", f"{f['count']:,}"),
                 ("fault latency p50/p90/p99", "/".join(
                     "-" if lat.get(k) is None else f"{lat[k]:.3f}"
                     for k in ("p50", "p90", "p99")) + " ms"),
                 ("vCPU time blocked", f"{f['blocked_ms']:.1f} ms"),
                 ("last page at", f"{f['last_page_ms']:.1f} ms")]
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
            if q.get("status") not in ("setup", "active", "postcopy-active"):
                return q
            p = q.get("progress")
            if p:
                left = p["round_pages_total"] - p["round_pages_done"]
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
@click.option("--mode", type=click.Choice([m.value for m in Mode]), default=None,
              help="strategy [handover for --to unix:PATH (RAM passed as memfds to a livemig "
              "on this host), else precopy]")
@click.option("--max-downtime", "max_downtime", type=float, default=300.0, show_default=True,
              help="target downtime in ms")
@click.option("--max-bandwidth", "max_bandwidth", type=RATE, default=None,
              help="rate cap in bytes/s, e.g. 100M, 1G (1G = 2^30 bytes/s)")
@click.option("--max-rounds", "max_rounds", type=click.IntRange(1), default=30, show_default=True)
@click.option("--auto-converge", is_flag=True, help="throttle vCPUs when rounds stop shrinking")
@click.option("--verify-memory", is_flag=True, help="compare keyed hashes of every page")
@click.option("--switchover-timeout", "switchover_timeout", type=click.FloatRange(0.1, 3600),
              default=None, help="seconds the guest may stay paused before READY; past it the "
              "source aborts and resumes [max(5, 10 x max-downtime)]")
@click.option("--compress", type=click.Choice(["zstd", "lz4", "auto"]), default=None,
              help="compress page batches (auto: only while the link is the bottleneck)")
@click.option("--xbzrle", is_flag=True, help="send a page sent before as a delta against it")
@click.option("--xbzrle-cache", "xbzrle_cache", type=SIZE, default="64M", show_default=True,
              help="memory for the previous copies (1M = 2^20 bytes)")
@click.option("--dedup", is_flag=True, help="send a page whose content went already as a "
              "reference (keyed BLAKE3)")
@click.option("--streams", type=click.IntRange(1, 16), default=1, show_default=True,
              help="page channels, each with its own thread")
@click.option("--hold-hot", "hold_hot", is_flag=True, help="hold pages dirtied in K of the "
              "last N rounds for the final round instead of re-sending them live")
@click.option("--hold-hot-k", "hold_hot_k", type=click.IntRange(1, 8), default=2, show_default=True)
@click.option("--hold-hot-n", "hold_hot_n", type=click.IntRange(1, 8), default=3, show_default=True)
@click.option("--skip-redirtied/--no-skip-redirtied", "skip_redirtied", default=True,
              show_default=True, help="live rounds leave out pages the guest dirtied again "
              "before they were reached; the next round sends them once")
@click.option("--postcopy-after", "postcopy_after", type=click.IntRange(1), default=None,
              help="hybrid: switch to post-copy after this many pre-copy rounds")
@click.option("--soft-net/--no-soft-net", "soft_net", default=True, show_default=True,
              help="forward frames that reach the old host after the switch-over to the new "
              "one (off: the destination only announces the guest, as QEMU)")
@click.option("--ship-template", "ship_template", is_flag=True, help="--mode tlm: if the "
              "destination lacks the clone's template, send it first (else migrate generically)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@security_options
def migrate_cmd(socket_path: str, target: str, mode: str | None, max_downtime: float,
                max_bandwidth: str | None, max_rounds: int, auto_converge: bool,
                verify_memory: bool, switchover_timeout: float | None, compress: str | None,
                xbzrle: bool, xbzrle_cache: int, dedup: bool, streams: int, hold_hot: bool,
                hold_hot_k: int, hold_hot_n: int, skip_redirtied: bool,
                postcopy_after: int | None, soft_net: bool,
                ship_template: bool, as_json: bool,
                key_file: str | None, tls_dir: str | None, insecure: bool) -> None:
    """Migrate the machine behind control SOCKET to a `livemig listen` at HOST:PORT (or
    unix:PATH)."""
    check_target(target)
    if mode is None:
        mode = Mode.HANDOVER.value if target.startswith("unix:") else Mode.PRECOPY.value
    auth = security_request(key_file, tls_dir, insecure)
    reply = request(socket_path, "migrate", to=target, mode=mode, max_downtime_ms=max_downtime,
                    max_bandwidth=max_bandwidth, max_rounds=max_rounds,
                    auto_converge=auto_converge, verify_memory=verify_memory,
                    switchover_timeout_s=switchover_timeout, compress=compress, xbzrle=xbzrle,
                    xbzrle_cache=xbzrle_cache, dedup=dedup, streams=streams,
                    hold_hot=hold_hot, hold_hot_k=hold_hot_k, hold_hot_n=hold_hot_n,
                    skip_redirtied=skip_redirtied, postcopy_after=postcopy_after, soft_net=soft_net,
                    ship_template=ship_template, **auth)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "migrate failed"))
    _finish(socket_path, as_json)


def _finish(socket_path: str, as_json: bool) -> None:
    """Watch the migration to its end; print the stats (table or JSON) and exit non-zero
    unless it completed."""
    q = _poll(socket_path, show=not as_json and sys.stderr.isatty())
    stats = q.get("stats") or {"status": q.get("status")}
    if as_json:
        # The stats object of docs/stats.md, with the final status and error of the attempt.
        click.echo(json.dumps(stats | {"status": q.get("status"), "error": q.get("error")}))
    elif q.get("status") == "completed" and q.get("stats"):
        _show_table(stats)
    if q.get("status") != "completed":
        if not as_json:
            click.echo(f"livemig: {outcome_line(q)}", err=True)
        sys.exit(2 if q.get("connected") is False else 1)  # unreachable --to: bad input


@click.command("migrate-recover")
@click.argument("socket_path", metavar="SOCKET")
@click.option("--to", "target", default=None,
              help="reconnect to this HOST:PORT (or unix:PATH) instead of the first address")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@security_options
def migrate_recover_cmd(socket_path: str, target: str | None, as_json: bool,
                        key_file: str | None, tls_dir: str | None, insecure: bool) -> None:
    """Resume a post-copy whose link broke (the machine behind control SOCKET is its source):
    new connections, the destination says which pages it lacks, they are sent."""
    fields: dict[str, Any] = {}
    if target is not None:
        check_target(target)
        fields["to"] = target
        if key_file or tls_dir or insecure:
            fields |= security_request(key_file, tls_dir, insecure)
    reply = request(socket_path, "migrate-recover", **fields)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "migrate-recover failed"))
    _finish(socket_path, as_json)


def add_commands(cli: click.Group) -> None:
    """Add `listen`, `migrate` and `migrate-recover` to the `livemig` command group."""
    cli.add_command(listen_cmd)
    cli.add_command(migrate_cmd)
    cli.add_command(migrate_recover_cmd)
