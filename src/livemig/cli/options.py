"""Option types and checks shared by the commands: sizes, rates, architectures, addresses."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import click

from livemig.contract import Arch, ConfigError
from livemig.units import SIZE_HELP, parse_rate, parse_size

__all__ = ["ARCH", "CONTROL_HELP", "NET", "NET_HELP", "RATE", "SIZE", "SIZE_HELP", "BadInput",
           "NetSpec", "check_target", "parse_rate", "parse_size", "random_mac"]


class BadInput(click.ClickException):
    """Something the user named (a file, a directory, an address, a port) cannot be used:
    one line, exit status 2."""

    exit_code = 2


class SizeType(click.ParamType):
    """A size such as 512M or 1G (binary: 1G = 2^30 bytes), converted to bytes."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class RateType(click.ParamType):
    """A rate such as 100M or 1G (per second, binary: 1G = 2^30 bytes/s); the text is kept as
    written (checked here), so that it can be passed on to a machine process."""

    name = "rate"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            parse_rate(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return str(value)


@dataclass(frozen=True)
class NetSpec:
    """`--net tap=NAME[,mac=52:54:00:..]`: the host TAP behind a NIC, and its MAC if given."""

    tap: str
    mac: str | None = None


class NetType(click.ParamType):
    """A `--net` value, checked here (a malformed MAC is bad input before anything starts)."""

    name = "net"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> NetSpec:
        if isinstance(value, NetSpec):
            return value
        fields: dict[str, str] = {}
        for part in str(value).split(","):
            key, eq, val = part.partition("=")
            if not eq or key not in ("tap", "mac") or key in fields or not val:
                self.fail(f"{value!r}: expected tap=NAME[,mac=XX:XX:XX:XX:XX:XX]", param, ctx)
            fields[key] = val
        if "tap" not in fields:
            self.fail(f"{value!r}: tap=NAME is required", param, ctx)
        if "mac" in fields:
            from livemig.machine.tap import parse_mac
            try:
                parse_mac(fields["mac"])
            except ConfigError as e:
                self.fail(str(e), param, ctx)
        return NetSpec(fields["tap"], fields.get("mac"))


def random_mac() -> str:
    """A locally administered unicast MAC in QEMU's 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


NET = NetType()
NET_HELP = "a virtio-net NIC behind host TAP NAME: tap=NAME[,mac=52:54:00:12:34:56] (repeatable)"
SIZE = SizeType()
RATE = RateType()
ARCH = click.Choice([a.value for a in Arch])
CONTROL_HELP = ("control socket path [$XDG_RUNTIME_DIR/livemig/PID.sock, "
                "else /tmp/livemig-UID/PID.sock]")


def check_target(target: str, option: str = "--to") -> tuple[str, int]:
    """`HOST:PORT` (or `[V6]:PORT`) of a destination, checked here so that a typo is bad input
    (BadInput: one line, exit 2) rather than a failed migration: the port must be 1..65535
    and the host must resolve. `unix:PATH` is taken as it is (port 0)."""
    if target.startswith("unix:") and len(target) > 5:
        return target[5:], 0
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise BadInput(f"{option} {target}: expected HOST:PORT")
    if not 1 <= int(port) <= 65535:
        raise BadInput(f"{option} {target}: port {port} is out of range (1-65535)")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise BadInput(f"{option} {target}: cannot resolve host {host}: {why}") from e
    return host, int(port)
