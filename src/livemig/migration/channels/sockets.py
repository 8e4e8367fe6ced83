"""Stream-socket channels: TCP, and unix sockets that can also carry file descriptors."""

from __future__ import annotations

import array
import socket
import time
from collections.abc import Sequence

from livemig.migration.channels.base import Channel, Role, close_socket
from livemig.migration.wire import MAX_PAYLOAD, send_buffers

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
        return send_buffers(self.sock, bufs, deadline)

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
        close_socket(self.sock)
