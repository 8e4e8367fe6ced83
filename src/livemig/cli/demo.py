"""`livemig demo`: boot a guest, migrate it live to a second process, show that it goes on.

Two machine processes on loopback by default; with `--netns` they live in two network
namespaces joined by a veth pair, optionally shaped with `tc` (`--link 1gbit`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click

from livemig.bench.pair import MigrationPair, PairError
from livemig.contract import Arch
from livemig.control import request
from livemig.images import guest_image

NS_SRC, NS_DST = "lmdemo-src", "lmdemo-dst"
# (RAM, hotset working set) when not given: the emulated ARM board copies and scans RAM slower
DEFAULTS = {Arch.X86_64: ("1G", "100M"), Arch.ARM64: ("256M", "32M")}
ADDR_SRC, ADDR_DST = "10.231.0.1", "10.231.0.2"


def _run(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise click.ClickException(f"{' '.join(cmd)} failed: {res.stderr.strip()}")


@contextlib.contextmanager
def network_namespaces(link: str | None) -> Iterator[None]:
    """Two namespaces joined by a veth pair; the link shaped with tc when asked."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        raise click.ClickException("--netns needs root and iproute2 (ip, tc)")
    for ns in (NS_SRC, NS_DST):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        _run("ip", "netns", "add", ns)
    try:
        _run("ip", "link", "add", "lm-src", "netns", NS_SRC, "type", "veth",
             "peer", "name", "lm-dst", "netns", NS_DST)
        for ns, dev, addr in ((NS_SRC, "lm-src", ADDR_SRC), (NS_DST, "lm-dst", ADDR_DST)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            if link:
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                     "tbf", "rate", link, "burst", "1mb", "latency", "50ms")
        yield
    finally:
        for ns in (NS_SRC, NS_DST):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except FileNotFoundError:
        return []


def run_demo(mem: str, vcpus: int, wss: str, netns: bool, extra: tuple[str, ...],
             arch: Arch = Arch.X86_64) -> None:
    ns = (["ip", "netns", "exec", NS_SRC], ["ip", "netns", "exec", NS_DST]) if netns else ([], [])
    try:
        pair = MigrationPair(guest_image("hotset", arch), mem, vcpus, f"wss={wss}", arch.value,
                             ADDR_DST if netns else "127.0.0.1", *ns)
    except PairError as e:
        raise click.ClickException(str(e)) from e
    with pair:
        click.echo(f"source: hotset on {arch.value}, {mem} RAM, {vcpus} vCPUs, wss={wss}; "
                   f"destination listening on {pair.target}")
        _show_run(pair, extra)


def _show_run(pair: MigrationPair, extra: tuple[str, ...]) -> None:
    try:
        pair.wait(lambda: pair.heartbeat(pair.src_sock) >= 3, 30, "the guest's first heartbeats")
        for line in _tail(pair.src_console, 3):
            click.echo(f"  [source]      {line}")
        click.echo(f"migrating live to {pair.target} ...")
        if pair.migrate(list(extra), capture=False).returncode:
            raise click.ClickException("migration failed; the source machine kept running")
        for line in _tail(pair.src_console, 2):
            click.echo(f"  [source, last] {line}")
        before = pair.heartbeat(pair.dst_sock)
        pair.wait(lambda: pair.heartbeat(pair.dst_sock) > before + 2, 20,
                  "heartbeats on the destination", alive=[pair.dst])
    except PairError as e:
        raise click.ClickException(str(e)) from e
    for line in _tail(pair.dst_console, 4):
        click.echo(f"  [destination] {line}")
    status = request(pair.dst_sock, "status")
    click.echo(f"destination: {status['state']}, last heartbeat "
               f"{status['probe']['last_heartbeat']['value']}, "
               f"failures {status['probe']['counts']['fail']}")


@click.command()
@click.option("--arch", type=click.Choice([a.value for a in Arch]), default=Arch.X86_64.value,
              show_default=True, help="x86_64 runs on KVM, arm64 on the emulated ARMv8 board")
@click.option("--mem", default=None, help="guest RAM  [default: 1G on x86_64, 256M on arm64]")
@click.option("--vcpus", default=2, show_default=True)
@click.option("--wss", default=None,
              help="hotset working set  [default: 100M on x86_64, 32M on arm64]")
@click.option("--netns", is_flag=True, help="two network namespaces joined by a veth pair")
@click.option("--link", default=None, help="shape the veth link with tc, e.g. 1gbit")
@click.argument("migrate_args", nargs=-1)
def demo(arch: str, mem: str | None, vcpus: int, wss: str | None, netns: bool,
         link: str | None, migrate_args: tuple[str, ...]) -> None:
    """Boot hotset, migrate it live to another process, show the report and the guest going on.

    Extra arguments after `--` go to `livemig migrate` (e.g. `-- --mode stop-copy`).
    """
    if link and not netns:
        raise click.UsageError("--link needs --netns")
    a = Arch(arch)
    mem = mem or DEFAULTS[a][0]
    wss = wss or DEFAULTS[a][1]
    if netns:
        with network_namespaces(link):
            run_demo(mem, vcpus, wss, True, migrate_args, a)
    else:
        run_demo(mem, vcpus, wss, False, migrate_args, a)

