"""Stream-socket channels: TCP, and unix sockets that can also carry file descriptors."""

from __future__ import annotations

import array
import select
import socket
import time
from collections.abc import Sequence

from livemig.migration.channels.base import Channel, Role
from livemig.migration.errors import ConnectionLost, Timeout
from livemig.migration.wire import MAX_PAYLOAD

SOCKET_BUFFER = 8 << 20
MAX_IOV = 512  # buffers per sendmsg (IOV_MAX is 1024)


def tune(sock: socket.socket) -> None:
    """Large buffers for page streams, TCP_NODELAY so handshake records go out at once."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class SocketChannel(Channel):
    """A plain stream socket; full duplex (a return-path thread may read while others send)."""

    def __init__(self, sock: socket.socket, role: Role = Role.MAIN,
                 limit: int = MAX_PAYLOAD) -> None:
        super().__init__(role, sock, limit)
        self.sock = sock
        self.kind = "unix" if sock.family == socket.AF_UNIX else "tcp"
        sock.settimeout(None)
        tune(sock)

    def _write(self, bufs: Sequence[bytes | memoryview], deadline: float | None) -> int:
        views = [memoryview(b).cast("B") for b in bufs if memoryview(b).nbytes]
        total = sum(v.nbytes for v in views)
        flags = 0 if deadline is None else socket.MSG_DONTWAIT
        try:
            while views:
                try:
                    n = self.sock.sendmsg(views[:MAX_IOV], [], flags)
                except BlockingIOError:
                    self._wait_writable(deadline)
                    continue
                while n:
                    if n >= views[0].nbytes:
                        n -= views[0].nbytes
                        views.pop(0)
                    else:
                        views[0] = views[0][n:]
                        n = 0
        except OSError as e:
            raise ConnectionLost(f"connection lost while sending: {e}") from e
        return total

    def _wait_writable(self, deadline: float | None) -> None:
        remaining = (deadline or 0) - time.monotonic()
        if remaining <= 0 or not select.select([], [self.sock], [], remaining)[1]:
            raise Timeout("the peer took nothing in time (link stalled)")

    def send_fds(self, data: bytes, fds: list[int]) -> None:
        """Send `data` with file descriptors attached (unix sockets only; SCM_RIGHTS)."""
        if self.kind != "unix":
            raise TypeError("file descriptors travel only over unix sockets")
        with self._wlock:
            socket.send_fds(self.sock, [data], fds)
            self.bytes_sent += len(data)

    def recv_fds(self, size: int, max_fds: int) -> tuple[bytes, list[int]]:
        """Receive up to `size` bytes and the descriptors sent with them."""
        data, fds, _flags, _addr = socket.recv_fds(self.sock, size, max_fds)
        return data, list(array.array("i", fds))

    def drain(self, timeout: float = 2.0) -> None:
        """Half-close, then read and drop until the peer closes (or `timeout`)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(timeout)
            end = time.monotonic() + timeout
            while time.monotonic() < end and self.sock.recv(1 << 16):
                pass
        except OSError:
            pass

    def close(self) -> None:
        """Shut down first: a thread blocked reading holds the socket open past close(),
        and the peer would see no end."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
