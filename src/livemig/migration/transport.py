"""TCP setup for migration connections and the bandwidth cap."""

from __future__ import annotations

import socket
import time

SOCKET_BUFFER = 8 << 20


def tune(sock: socket.socket) -> None:
    """Large buffers for page streams, TCP_NODELAY so handshake records go out at once."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def parse_hostport(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` into (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def connect(target: str, timeout: float = 10.0) -> socket.socket:
    """Open a tuned TCP connection to `HOST:PORT`."""
    sock = socket.create_connection(parse_hostport(target), timeout=timeout)
    sock.settimeout(None)
    tune(sock)
    return sock


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one)."""
    srv = socket.create_server((host, port), reuse_port=False)
    return srv


class RateLimiter:
    """Sleeps as needed so that bytes reported through `spent` stay under `rate` bytes/s."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._start = time.monotonic()
        self._bytes = 0

    def spent(self, nbytes: int) -> None:
        if not self.rate:
            return
        self._bytes += nbytes
        ahead = self._bytes / self.rate - (time.monotonic() - self._start)
        if ahead > 0:
            time.sleep(ahead)
        elif ahead < -0.5:  # idle for a while: do not let a burst make up for it
            self._start = time.monotonic()
            self._bytes = 0
