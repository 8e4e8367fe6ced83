"""Stream-socket channels: TCP, and unix sockets that can also carry file descriptors."""

from __future__ import annotations

import array
import os
import socket
import time
from collections.abc import Sequence

from livemig.migration.channels.base import Channel, Role, close_socket
from livemig.migration.wire import MAX_PAYLOAD, RecordType, frame, send_buffers

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


MAX_FDS = 8  # descriptors a unix channel keeps from its peer at most; more are closed


class _UnixReader:
    """Reads a unix socket with recvmsg, keeping the descriptors that come with the bytes
    (a plain recv would silently drop them)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fds: list[int] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self, buffer: memoryview) -> int:
        n, anc, _flags, _addr = self.sock.recvmsg_into([buffer], socket.CMSG_SPACE(4 * MAX_FDS),
                                                        socket.MSG_CMSG_CLOEXEC)
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                for fd in fds:
                    if len(self.fds) < MAX_FDS:
                        self.fds.append(fd)
                    else:
                        os.close(fd)
        return n

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


class SocketChannel(Channel):
    """A plain stream socket; full duplex (a return-path thread may read while others send).
    On a unix socket, records may carry file descriptors (`send_with_fds`, `take_fds`)."""

    def __init__(self, sock: socket.socket, role: Role = Role.MAIN,
                 limit: int = MAX_PAYLOAD) -> None:
        self._unix = _UnixReader(sock) if sock.family == socket.AF_UNIX else None
        super().__init__(role, self._unix or sock, limit)
        self.sock = sock
        self.kind = "unix" if sock.family == socket.AF_UNIX else "tcp"
        sock.settimeout(None)
        tune(sock)

    def send_with_fds(self, rtype: RecordType, *parts: bytes | memoryview,
                      fds: list[int], deadline: float | None = None) -> int:
        """Send one record with `fds` attached to its first byte (unix sockets only)."""
        if self._unix is None:
            raise TypeError("file descriptors travel only over unix sockets")
        data = b"".join(frame(rtype, *parts))
        with self._wlock:
            sent = socket.send_fds(self.sock, [data], fds)
            if sent < len(data):
                send_buffers(self.sock, [memoryview(data)[sent:]], deadline)
            self.bytes_sent += len(data)
            self.records_sent += 1
        return len(data)

    def take_fds(self) -> list[int]:
        """The descriptors received so far (the caller owns them from now on)."""
        if self._unix is None:
            return []
        fds, self._unix.fds = self._unix.fds, []
        return fds

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
        if self._unix is not None:
            self._unix.close()
