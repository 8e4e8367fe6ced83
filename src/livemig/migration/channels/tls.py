"""TLS channels: a mutually authenticated, encrypted connection.

Python's ssl objects must not be read in one thread while written in another, so a TLS
channel is not duplex: a session over TLS gives the destination's answers their own
connection (role RETURN) and uses each connection in one direction only after the hello.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Sequence

from livemig.migration.channels.base import Channel, Role, close_socket
from livemig.migration.channels.sockets import tune
from livemig.migration.errors import AuthError, ConnectionLost, Timeout
from livemig.migration.wire import MAX_PAYLOAD

SEND_CHUNK = 1 << 20  # bytes per sendall: small buffers are joined, large ones go as they are


class TlsChannel(Channel):
    """A TLS connection; `wrap_client` / `wrap_server` run the handshake with a deadline."""

    kind = "tls"
    duplex = False

    def __init__(self, sock: ssl.SSLSocket, role: Role = Role.MAIN,
                 limit: int = MAX_PAYLOAD) -> None:
        super().__init__(role, sock, limit)
        self.sock = sock

    @classmethod
    def wrap_client(cls, sock: socket.socket, ctx: ssl.SSLContext, role: Role,
                    timeout: float, limit: int = MAX_PAYLOAD) -> TlsChannel:
        tune(sock)
        return cls(_handshake(lambda: ctx.wrap_socket(sock, server_side=False), sock, timeout),
                   role, limit)

    @classmethod
    def wrap_server(cls, sock: socket.socket, ctx: ssl.SSLContext, timeout: float,
                    limit: int) -> TlsChannel:
        tune(sock)
        return cls(_handshake(lambda: ctx.wrap_socket(sock, server_side=True), sock, timeout),
                   Role.MAIN, limit)

    def _write(self, bufs: Sequence[bytes | memoryview], deadline: float | None) -> int:
        total = 0
        try:
            for chunk in _coalesce(bufs):
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Timeout("the peer took nothing in time (link stalled)")
                    self.sock.settimeout(remaining)
                self.sock.sendall(chunk)
                total += memoryview(chunk).nbytes
        except TimeoutError as e:
            raise Timeout("the peer took nothing in time (link stalled)") from e
        except OSError as e:
            raise ConnectionLost(f"connection lost while sending: {e}") from e
        finally:
            if deadline is not None:
                self.sock.settimeout(None)
        return total

    def close(self) -> None:
        close_socket(self.sock)


def _handshake(wrap: object, sock: socket.socket, timeout: float) -> ssl.SSLSocket:
    sock.settimeout(timeout)
    try:
        tls: ssl.SSLSocket = wrap()  # type: ignore[operator]
    except ssl.SSLError as e:
        raise AuthError(f"TLS handshake failed: {e.reason or e}") from e
    except TimeoutError as e:
        raise Timeout("TLS handshake did not finish in time") from e
    except OSError as e:
        raise ConnectionLost(
            f"connection lost in the TLS handshake ({e}): does the peer use TLS (--tls-dir)?"
        ) from e
    tls.settimeout(None)
    return tls


def _coalesce(bufs: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """Join runs of small buffers (headers, tables) so that each becomes one TLS record."""
    out: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = []
    for b in bufs:
        if memoryview(b).nbytes >= SEND_CHUNK // 4:
            if small:
                out.append(b"".join(small))
                small = []
            out.append(b)
        else:
            small.append(b)
    if small:
        out.append(b"".join(small))
    return out
