"""A network lab on one machine: a source host, a destination host and a client, each a network
namespace, joined by a Linux bridge in a fourth namespace (the "switch").

    client ns:  eth0 10.77.0.100 ───┐
    source ns:  br0 10.77.0.1 ─ up0 ─┼─ switch ns: bridge sw0 (ports p-cli, p-src, p-dst)
                 └ tap lmtap0 (guest)│
    dest ns:    br0 10.77.0.2 ─ up0 ─┘
                 └ tap lmtap0 (guest)

Each host has a persistent TAP (`lmtap0`) on its own bridge, as a hypervisor host would; the
guest (10.77.0.10) is reached through whichever host's TAP the switch has learnt its MAC on,
so a guest that moves must be announced (or its frames forwarded) for clients to keep
reaching it. The host-to-switch links may be shaped with `tc tbf` (`rate`). Namespaces are
named `<name>-sw|src|dst|cli`; `down` deletes them (and with them every device in them).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from livemig.bench.netns import NetworkError, _delete, _run, can_make_namespaces

SUBNET = "10.77.0"
TAP = "lmtap0"
ROLES = ("sw", "src", "dst", "cli")


@dataclass(frozen=True)
class Lab:
    """Names and addresses of one lab."""

    name: str
    tap: str = TAP
    guest_ip: str = f"{SUBNET}.10"
    src_ip: str = f"{SUBNET}.1"
    dst_ip: str = f"{SUBNET}.2"
    client_ip: str = f"{SUBNET}.100"

    def ns(self, role: str) -> str:
        return f"{self.name}-{role}"

    def exec(self, role: str) -> list[str]:
        """Command prefix that runs a program in the namespace of `role`."""
        return ["ip", "netns", "exec", self.ns(role)]

    def to_dict(self) -> dict[str, str]:
        return asdict(self) | {f"ns_{r}": self.ns(r) for r in ROLES}


def up(name: str = "lmlab", rate: str | None = None) -> Lab:
    """Build the lab (an old one of the same name is removed first)."""
    why = can_make_namespaces()
    if why:
        raise NetworkError(why)
    if not 1 <= len(name) <= 8 or not name.isalnum():
        raise NetworkError(f"lab name {name!r} must be 1-8 letters or digits")
    lab = Lab(name)
    down(name)
    try:
        _build(lab, rate)
    except NetworkError:
        down(name)
        raise
    return lab


def _build(lab: Lab, rate: str | None) -> None:
    sw = lab.ns("sw")
    for r in ROLES:
        _run("ip", "netns", "add", lab.ns(r))
        _run("ip", "-n", lab.ns(r), "link", "set", "lo", "up")
    _run("ip", "-n", sw, "link", "add", "sw0", "type", "bridge", "stp_state", "0")
    _run("ip", "-n", sw, "link", "set", "sw0", "up")
    _run("ip", "-n", sw, "link", "add", "p-cli", "type", "veth", "peer", "name", "eth0",
         "netns", lab.ns("cli"))
    _port(sw, "p-cli", rate)
    _run("ip", "-n", lab.ns("cli"), "addr", "add", f"{lab.client_ip}/24", "dev", "eth0")
    _run("ip", "-n", lab.ns("cli"), "link", "set", "eth0", "up")
    for role, ip in (("src", lab.src_ip), ("dst", lab.dst_ip)):
        ns = lab.ns(role)
        _run("ip", "-n", sw, "link", "add", f"p-{role}", "type", "veth", "peer", "name", "up0",
             "netns", ns)
        _port(sw, f"p-{role}", rate)
        _run("ip", "-n", ns, "link", "add", "br0", "type", "bridge", "stp_state", "0")
        _run("ip", "-n", ns, "tuntap", "add", "dev", lab.tap, "mode", "tap")
        # Room for the frames of a long pause (the hypervisor reads the TAP while paused).
        _run("ip", "-n", ns, "link", "set", lab.tap, "txqueuelen", "10000")
        for dev in ("up0", lab.tap):
            _run("ip", "-n", ns, "link", "set", dev, "master", "br0")
            _run("ip", "-n", ns, "link", "set", dev, "up")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "br0")
        _run("ip", "-n", ns, "link", "set", "br0", "up")
        if rate:
            _shape(ns, "up0", rate)


def _port(sw: str, dev: str, rate: str | None) -> None:
    _run("ip", "-n", sw, "link", "set", dev, "master", "sw0")
    _run("ip", "-n", sw, "link", "set", dev, "up")
    if rate:
        _shape(sw, dev, rate)


def _shape(ns: str, dev: str, rate: str) -> None:
    _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
         rate, "burst", "256kb", "latency", "50ms")


def down(name: str = "lmlab") -> None:
    """Delete the lab's namespaces (nothing happens for those that do not exist)."""
    _delete([f"{name}-{r}" for r in ROLES])


def exists(name: str = "lmlab") -> bool:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return any(line.split()[0] == f"{name}-sw" for line in res.stdout.splitlines() if line)


@contextlib.contextmanager
def lab(name: str = "lmlab", rate: str | None = None) -> Iterator[Lab]:
    """A lab for the duration of a `with` block; deleted on exit, also after errors."""
    made = up(name, rate)
    try:
        yield made
    finally:
        down(name)


def describe(lab: Lab) -> str:
    return json.dumps(lab.to_dict())
