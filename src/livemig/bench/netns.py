"""Networks for benchmark runs: where both sides of a migration run, and a byte counter.

A `Network` says which command prefix each side runs under (``ip netns exec NS``), which
address the destination listens on, and how to read the bytes that crossed the link, so that
livemig and QEMU are measured on the same wire and their bytes counted the same way (QEMU's own
``ram.transferred`` counts multifd pages before compression).

- `private_loopback`: one fresh network namespace with only ``lo`` up; both sides run in it and
  talk over 127.0.0.1, exactly as on the host's loopback, but the namespace's ``lo`` counters
  see nothing but this run (both directions: ``lo`` transmits every packet once).
- `shaped_link`: two namespaces joined by a veth pair, each end shaped with ``tc tbf`` at the
  given rate (``1gbit``), as `livemig demo --netns --link` sets up; the counter is what the
  source's end transmitted.
- `host_loopback`: no namespace (without root): no counter.

Namespaces are named with this process's id, so that concurrent runs (and the demo's
``lmdemo-*``) never meet; they are deleted on exit, also after errors.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

ADDR_SRC, ADDR_DST = "10.231.9.1", "10.231.9.2"
VETH_SRC, VETH_DST = "lmb-src", "lmb-dst"


class NetworkError(RuntimeError):
    """A namespace or link could not be set up; the message says why, in one line."""


@dataclass
class Network:
    """Where a run's two sides live and how its link bytes are read."""

    name: str  # "loopback", "1gbit"
    src_prefix: list[str] = field(default_factory=list)
    dst_prefix: list[str] = field(default_factory=list)
    dst_host: str = "127.0.0.1"
    counter_ns: str | None = None  # namespace and device whose tx_bytes count the link
    counter_dev: str | None = None
    namespaces: list[str] = field(default_factory=list)

    def link_bytes(self) -> int | None:
        """Bytes transmitted so far on the counted device; None without a counter."""
        if self.counter_ns is None or self.counter_dev is None:
            return None
        res = subprocess.run(["ip", "netns", "exec", self.counter_ns, "cat",
                              f"/sys/class/net/{self.counter_dev}/statistics/tx_bytes"],
                             capture_output=True, text=True, timeout=10)
        try:
            return int(res.stdout.strip())
        except ValueError:
            return None

    def describe(self) -> str:
        if not self.namespaces:
            return f"{self.name} (host)"
        return f"{self.name} (netns {', '.join(self.namespaces)})"


def can_make_namespaces() -> str | None:
    """None when namespaces can be made here, else why not (one line)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    return None


def _run(*cmd: str) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetworkError(f"{' '.join(cmd)}: {e}") from e
    if res.returncode:
        raise NetworkError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")


def _delete(namespaces: list[str]) -> None:
    for ns in namespaces:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _exec(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


@contextlib.contextmanager
def host_loopback() -> Iterator[Network]:
    """The host's own loopback: nothing to set up, nothing counted."""
    yield Network("loopback")


@contextlib.contextmanager
def private_loopback(tag: str = "") -> Iterator[Network]:
    """A fresh namespace with ``lo`` up; both sides in it on 127.0.0.1; ``lo`` counted."""
    why = can_make_namespaces()
    if why:
        raise NetworkError(why)
    ns = f"lmb{os.getpid()}{tag}-lo"
    _delete([ns])
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield Network("loopback", _exec(ns), _exec(ns), "127.0.0.1", ns, "lo", [ns])
    finally:
        _delete([ns])


@contextlib.contextmanager
def shaped_link(rate: str, tag: str = "") -> Iterator[Network]:
    """Two namespaces joined by a veth pair, both ends shaped to ``rate`` (tc tbf)."""
    why = can_make_namespaces()
    if why:
        raise NetworkError(why)
    src, dst = f"lmb{os.getpid()}{tag}-src", f"lmb{os.getpid()}{tag}-dst"
    _delete([src, dst])
    try:
        for ns in (src, dst):
            _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", VETH_SRC, "netns", src, "type", "veth",
             "peer", "name", VETH_DST, "netns", dst)
        for ns, dev, addr in ((src, VETH_SRC, ADDR_SRC), (dst, VETH_DST, ADDR_DST)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                 "tbf", "rate", rate, "burst", "1mb", "latency", "50ms")
        yield Network(rate, _exec(src), _exec(dst), ADDR_DST, src, VETH_SRC, [src, dst])
    finally:
        _delete([src, dst])
