"""The channel contract: a framed record stream with a role, safe for several writers."""

from __future__ import annotations

import enum
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

from livemig.migration.wire import (
    MAX_PAYLOAD,
    Header,
    Readable,
    Record,
    RecordReader,
    RecordType,
    frame,
)


def close_socket(sock: socket.socket) -> None:
    """Shut down, then close: a thread blocked reading holds a socket open past close(), and
    the peer would see no end."""
    for step in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            step()
        except OSError:
            pass


class Role(enum.Enum):
    """What a connection of a session carries (named in its hello)."""

    MAIN = "main"  # source -> destination: the migration itself
    RETURN = "return"  # destination -> source, when MAIN cannot be read and written at once
    RESOLVE = "resolve"  # a later connection asking whether COMMIT arrived
    PAGES = "pages"  # source -> destination: page batches of one stream (`pages-N`)
    URGENT = "urgent"  # source -> destination, post-copy: the pages faults asked for
    RECOVER = "recover"  # source -> destination: replaces MAIN of a broken post-copy
    NET = "net"  # source -> destination after COMMIT: frames forwarded (soft handover)
    TEMPLATE = "template"  # source -> destination: a template the destination lacks (TLM)


class Channel(ABC):
    """One direction-agnostic record stream.

    `send` frames a record and writes it whole under the channel's writer lock, so several
    threads may send. `read` returns the next checked record. `duplex` says whether one thread
    may read while another writes (false for TLS: Python's ssl objects are not safe for it).
    """

    kind = "abstract"
    duplex = True

    def __init__(self, role: Role, reader_source: Readable | None,
                 limit: int = MAX_PAYLOAD) -> None:
        self.role = role
        self.label = role.value  # what the stats call it (`pages-2` for a page stream)
        self._wlock = threading.Lock()
        self.reader = RecordReader(reader_source, limit) if reader_source is not None else None
        self.bytes_sent = 0
        self.records_sent = 0

    @property
    def bytes_received(self) -> int:
        return self.reader.bytes_read if self.reader is not None else 0

    def set_limit(self, limit: int) -> None:
        """Largest payload accepted from now on (small until the peer is authenticated)."""
        if self.reader is not None:
            self.reader.limit = min(limit, MAX_PAYLOAD)

    def send(self, rtype: RecordType, *parts: bytes | memoryview,
             deadline: float | None = None) -> int:
        """Frame and send one record; returns its size on the wire. `deadline`
        (time.monotonic) bounds how long a stalled peer may block it (raises Timeout)."""
        bufs = frame(rtype, *parts)
        with self._wlock:
            n = self._write(bufs, deadline)
            self.bytes_sent += n
            self.records_sent += 1
        return n

    def send_with_fds(self, rtype: RecordType, *parts: bytes | memoryview,
                      fds: list[int], deadline: float | None = None) -> int:
        """Send one record carrying file descriptors: only unix socket channels can."""
        raise TypeError(f"a {self.kind} channel cannot carry file descriptors")

    def take_fds(self) -> list[int]:
        """File descriptors the peer sent, now the caller's ([] for kinds that carry none)."""
        return []

    def read(self, deadline: float | None = None) -> Record:
        """The next record (payload valid until the next read)."""
        return self._reader().read(deadline)

    def read_header(self, deadline: float | None = None) -> Header:
        """The next record's header alone (`read_payload`, or the reader itself, for the
        rest)."""
        return self._reader().read_header(deadline)

    def read_payload(self, head: Header, deadline: float | None = None) -> Record:
        """The checked payload of the record whose header `read_header` returned."""
        return self._reader().read_payload(head, deadline)

    def _reader(self) -> RecordReader:
        if self.reader is None:
            raise TypeError(f"{self.kind} channel {self.role.value} is write-only")
        return self.reader

    def stats(self) -> dict[str, object]:
        """Per-channel figures for MigrationStats."""
        return {"kind": self.kind, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "records_sent": self.records_sent}

    @abstractmethod
    def _write(self, bufs: Sequence[bytes | memoryview], deadline: float | None) -> int:
        """Write every byte of `bufs` (called under the writer lock)."""

    @abstractmethod
    def close(self) -> None:
        """Release the channel; safe to call twice."""

    def drain(self, timeout: float = 2.0) -> None:  # noqa: B027 - optional for a kind
        """After a last record: let it reach the peer before the connection closes (closing
        with unread input would send a reset, which can destroy the record in flight)."""
