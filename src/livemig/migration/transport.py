"""Where migrations go: addresses, dialing (TCP, unix, TLS on either), listening sockets."""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass

from livemig.migration.channels import Channel, Role, SocketChannel, TlsChannel
from livemig.migration.errors import ConnectionLost, MigrationError
from livemig.migration.security import Security

CONNECT_TIMEOUT = 10.0


class AddressError(MigrationError):
    """An address that cannot be used (malformed, out of range, unresolvable)."""


@dataclass(frozen=True)
class Address:
    """`HOST:PORT`, `[V6]:PORT` or `unix:PATH`."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, allow_any_port: bool = False) -> Address:
    """Parse a destination address; AddressError names what is wrong (ports 1..65535)."""
    if text.startswith("unix:"):
        if not text[5:]:
            raise AddressError("unix: address needs a socket path")
        return Address(path=text[5:])
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise AddressError(f"expected HOST:PORT or unix:PATH, got {text!r}")
    lo = 0 if allow_any_port else 1
    if not lo <= int(port) <= 65535:
        raise AddressError(f"port {port} in {text!r} is out of range ({lo}..65535)")
    return Address(host=host.strip("[]") or "127.0.0.1", port=int(port))


def _connect(addr: Address, timeout: float) -> socket.socket:
    try:
        if addr.is_unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(addr.path)
            return s
        return socket.create_connection((addr.host, addr.port), timeout=timeout)
    except socket.gaierror as e:
        raise AddressError(f"cannot resolve {addr.host}: {e.strerror}") from e
    except OSError as e:
        raise ConnectionLost(f"cannot connect to {addr}: {e.strerror or e}") from e


def dial(addr: Address, sec: Security, role: Role = Role.MAIN,
         timeout: float = CONNECT_TIMEOUT) -> Channel:
    """Open one connection of a session: a plain channel, or TLS when `sec` has a context."""
    sock = _connect(addr, timeout)
    if sec.tls_client is None:
        return SocketChannel(sock, role)
    try:
        return TlsChannel.wrap_client(sock, sec.tls_client, role, timeout)
    except MigrationError:
        sock.close()
        raise


def bind(addr: Address) -> socket.socket:
    """A listening socket at `addr` (port 0 picks a free one; a stale unix socket file is
    replaced, anything else at that path is refused)."""
    try:
        if not addr.is_unix:
            return socket.create_server((addr.host, addr.port), reuse_port=False, backlog=64)
        if os.path.lexists(addr.path):
            if not stat.S_ISSOCK(os.lstat(addr.path).st_mode):
                raise AddressError(f"{addr.path} exists and is not a socket")
            os.unlink(addr.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(addr.path)
        finally:
            os.umask(old)
        s.listen(64)
        return s
    except socket.gaierror as e:
        raise AddressError(f"cannot resolve {addr.host}: {e.strerror}") from e
    except OSError as e:
        raise AddressError(f"cannot listen on {addr}: {e.strerror or e}") from e
