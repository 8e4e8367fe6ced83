"""Record framing: every byte on a migration connection belongs to a framed record.

A record is a 16-byte header followed by `length` payload bytes (all little-endian):

    offset size field
    0      2    magic        b"LM"
    2      1    type         RecordType
    3      1    flags        0 (reserved; a receiver rejects anything else)
    4      4    length       payload bytes, at most MAX_PAYLOAD
    8      4    payload_crc  CRC-32 (zlib polynomial) of the payload
    12     4    header_crc   CRC-32 of header bytes 0..11

The header CRC lets a receiver reject a damaged length before reading any payload. See
docs/protocol.md for the record types and the order they may come in.
"""

from __future__ import annotations

import enum
import select
import socket
import ssl
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from zlib_ng import zlib_ng as zlib  # same CRC-32 as zlib, SIMD-accelerated

from livemig.migration.errors import ConnectionLost, ProtocolError, Timeout

MAGIC = b"LM"
HEADER = struct.Struct("<2sBBIII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 16 << 20  # 16 MiB: a page batch, a state or a verify table fits
MAX_IOV = 512  # buffers per sendmsg (IOV_MAX is 1024)


class RecordType(enum.IntEnum):
    """Every record type; values are stable across protocol versions."""

    HELLO = 1  # source -> destination: versions and features offered
    WELCOME = 2  # destination -> source: version and features chosen
    CONFIG = 3  # source -> destination: machine config (msgpack)
    CONFIG_OK = 4  # destination -> source: empty machine built
    PAGES = 5  # source -> destination: a batch of pages
    ROUND_END = 6  # source -> destination: end of a round (msgpack)
    ROUND_ACK = 7  # destination -> source: round applied (msgpack)
    VERIFY = 8  # source -> destination: keyed hash per page
    STATE = 9  # source -> destination: machine state and probe state (msgpack)
    READY = 10  # destination -> source: everything loaded, may COMMIT
    COMMIT = 11  # source -> destination: run; the source will never resume
    RUNNING = 12  # destination -> source: the machine runs at the destination
    REPORT = 13  # destination -> source: destination-side figures (msgpack)
    ABORT = 14  # source -> destination: give up, discard the machine (utf-8 reason)
    ERROR = 15  # destination -> source: refused or failed (utf-8 reason)
    AUTH = 16  # either way, in the hello: HMAC proof of the pre-shared key
    OUTCOME = 17  # destination -> source, on a resolve connection: was COMMIT received
    PAGE_REQUEST = 18  # destination -> source, post-copy: pages a fault waits for (u64 each)
    COMPLETE = 19  # destination -> source, post-copy: every page is here (msgpack figures)
    MISSING = 20  # destination -> source, post-copy recovery: pages still lacking (bitmap)
    NET_FRAMES = 40  # source -> destination, on the net connection: forwarded frames
    NET_END = 41  # source -> destination, on the net connection: forwarding is over


@dataclass
class Record:
    """One received record; `payload` is a view on the receiver's buffer."""

    type: RecordType
    payload: memoryview

    def text(self) -> str:
        """The payload as a UTF-8 reason (ERROR, ABORT), damaged bytes replaced."""
        return bytes(self.payload).decode("utf-8", "replace")


def crc32(parts: Sequence[bytes | memoryview]) -> int:
    """CRC-32 over the concatenation of `parts` (zlib releases the GIL on big buffers)."""
    c = 0
    for p in parts:
        c = zlib.crc32(p, c)
    return c


def header(rtype: RecordType, length: int, payload_crc: int) -> bytes:
    """Build the 16-byte header of a record."""
    if length > MAX_PAYLOAD:
        raise ValueError(f"record payload of {length} bytes exceeds {MAX_PAYLOAD}")
    head = HEADER.pack(MAGIC, int(rtype), 0, length, payload_crc, 0)
    return head[:12] + struct.pack("<I", zlib.crc32(head[:12]))


def frame(rtype: RecordType, *parts: bytes | memoryview) -> list[bytes | memoryview]:
    """The buffers of one record (header first), ready for `send_buffers`."""
    length = sum(memoryview(p).nbytes for p in parts)
    return [header(rtype, length, crc32(parts)), *parts]


def wait_ready(fd: int, events: int, deadline: float) -> bool:
    """Wait until `fd` is ready for `events` (poll: any fd number) or `deadline` passes."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    p = select.poll()
    p.register(fd, events | select.POLLERR | select.POLLHUP)
    return bool(p.poll(remaining * 1000))


def send_buffers(sock: socket.socket, bufs: Sequence[bytes | memoryview],
                 deadline: float | None = None) -> int:
    """Send every byte of `bufs` with as few `sendmsg` calls as the kernel allows; with a
    `deadline` (time.monotonic) a peer that takes nothing in time raises Timeout."""
    views = [memoryview(b).cast("B") for b in bufs if memoryview(b).nbytes]
    total = sum(v.nbytes for v in views)
    flags = 0 if deadline is None else socket.MSG_DONTWAIT
    try:
        while views:
            try:
                n = sock.sendmsg(views[:MAX_IOV], [], flags)
            except BlockingIOError:
                if not wait_ready(sock.fileno(), select.POLLOUT, deadline or 0):
                    raise Timeout("the peer took nothing in time (link stalled)") from None
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


def send_record(sock: socket.socket, rtype: RecordType, *parts: bytes | memoryview) -> int:
    """Frame and send one record; returns the bytes put on the wire."""
    return send_buffers(sock, frame(rtype, *parts))


def parse_header(head: bytes | memoryview, limit: int = MAX_PAYLOAD) -> tuple[RecordType, int, int]:
    """Check a header and return (type, length, payload_crc); ProtocolError if bad or if the
    payload is longer than `limit` (the reader's own limit, at most MAX_PAYLOAD)."""
    magic, rtype, flags, length, pcrc, hcrc = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"bad record magic {bytes(magic)!r}: not a livemig migration stream")
    if zlib.crc32(head[:12]) != hcrc:
        raise ProtocolError("corrupt record header (header CRC mismatch)")
    if rtype not in RecordType._value2member_map_:
        raise ProtocolError(f"unknown record type {rtype}")
    if flags != 0:
        raise ProtocolError(f"record {RecordType(rtype).name} has unknown flags {flags:#x}")
    if length > limit:
        raise ProtocolError(
            f"oversized record ({RecordType(rtype).name}, too large): {length} bytes, the "
            f"limit here is {limit}"
        )
    return RecordType(rtype), length, pcrc


class Readable(Protocol):
    """What a RecordReader reads from: a socket, an SSL socket, a file adapter."""

    def recv_into(self, buffer: memoryview) -> int: ...

    def fileno(self) -> int: ...


class RecordReader:
    """Reads whole records from a socket (or anything with `recv_into` and `fileno`).

    The buffer grows with the records actually seen, up to `limit` (raised once a peer is
    authenticated), so a connection that never authenticates costs little memory. `deadline`
    (time.monotonic) bounds each `read` as a whole: a peer sending one byte a second cannot
    hold the reader longer than that.
    """

    def __init__(self, sock: Readable, max_payload: int = MAX_PAYLOAD) -> None:
        self.sock = sock
        self.limit = max_payload
        self._buf = bytearray(HEADER_SIZE + min(max_payload, 1 << 16))
        self.bytes_read = 0
        # a plain socket: MSG_DONTWAIT, recvmsg_into (not TLS, not a file)
        self._plain = isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket)

    def _wait(self, deadline: float | None, what: str) -> None:
        if deadline is None:
            return
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending():
            return  # TLS: decrypted bytes already buffered
        if not wait_ready(self.sock.fileno(), select.POLLIN, deadline):
            raise Timeout(f"peer sent nothing in time while {what} was due")

    def _dontwait(self, deadline: float | None) -> bool:
        """Whether to try a read without waiting first (then poll only if nothing is there):
        a plain blocking socket with a deadline to honour."""
        sock = self.sock
        return (deadline is not None and self._plain and isinstance(sock, socket.socket)
                and sock.gettimeout() is None)

    def fill(self, view: memoryview, what: str, deadline: float | None) -> None:
        """Read exactly `view.nbytes` bytes into `view` (ConnectionLost at EOF, Timeout)."""
        got = 0
        while got < view.nbytes:
            try:
                if self._dontwait(deadline) and isinstance(self.sock, socket.socket):
                    # bytes already here (the usual case) need no poll first
                    try:
                        n = self.sock.recv_into(view[got:], 0, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        self._wait(deadline, what)
                        continue
                else:
                    self._wait(deadline, what)
                    n = self.sock.recv_into(view[got:])
            except TimeoutError as e:
                raise Timeout(f"peer sent nothing in time while {what} was due") from e
            except OSError as e:
                raise ConnectionLost(f"connection lost while reading {what}: {e}") from e
            if n == 0:
                if got == 0 and what == "record header":
                    raise ConnectionLost("connection closed by peer")
                raise ConnectionLost(f"connection closed in the middle of {what} (truncated)")
            got += n
        self.bytes_read += got

    def fill_many(self, views: Sequence[memoryview], what: str,
                  deadline: float | None) -> None:
        """Fill every one of `views` in order, scattered by one `recvmsg_into` for many
        buffers where the source is a plain socket."""
        if not self._plain:
            for v in views:
                self.fill(v, what, deadline)
            return
        sock = self.sock
        assert isinstance(sock, socket.socket)
        todo = [v for v in views if v.nbytes]
        flags = socket.MSG_DONTWAIT if self._dontwait(deadline) else 0
        i = 0
        while i < len(todo):
            try:
                try:
                    n = sock.recvmsg_into(todo[i : i + MAX_IOV], 0, flags)[0]
                except BlockingIOError:
                    self._wait(deadline, what)
                    continue
            except TimeoutError as e:
                raise Timeout(f"peer sent nothing in time while {what} was due") from e
            except OSError as e:
                raise ConnectionLost(f"connection lost while reading {what}: {e}") from e
            if n == 0:
                raise ConnectionLost(f"connection closed in the middle of {what} (truncated)")
            self.bytes_read += n
            while n:
                if n >= todo[i].nbytes:
                    n -= todo[i].nbytes
                    i += 1
                else:
                    todo[i] = todo[i][n:]
                    n = 0

    def read(self, deadline: float | None = None) -> Record:
        """Block until one whole, checked record has arrived; the payload is valid until the
        next call. Raises ProtocolError on bad input, ConnectionLost on EOF, Timeout after
        `deadline`."""
        return self.read_payload(self.read_header(deadline), deadline)

    def read_payload(self, head: Header, deadline: float | None = None) -> Record:
        """The payload of the record whose header `read_header` returned, checked."""
        payload = self.payload_buffer(head.length)
        self.fill(payload, f"{head.type.name} record", deadline)
        head.check(zlib.crc32(payload))
        return Record(head.type, payload)

    def read_header(self, deadline: float | None = None) -> Header:
        """Read and check the next record's header only: its payload is the caller's to read
        (with `fill`, into `payload_buffer` or anywhere else), and to check with
        `Header.check`."""
        head = memoryview(self._buf)[:HEADER_SIZE]
        self.fill(head, "record header", deadline)
        rtype, length, pcrc = parse_header(head, self.limit)
        return Header(rtype, length, pcrc)

    def payload_buffer(self, length: int) -> memoryview:
        """The reader's own buffer for a payload of `length` bytes (at most the limit checked
        by `read_header`), valid until the next read."""
        if len(self._buf) < HEADER_SIZE + length:
            self._buf = bytearray(HEADER_SIZE + length)
        return memoryview(self._buf)[HEADER_SIZE : HEADER_SIZE + length]


@dataclass
class Header:
    """A checked record header: the payload's type, length and CRC."""

    type: RecordType
    length: int
    crc: int

    def check(self, crc: int) -> None:
        """ProtocolError unless `crc` (of the payload as received) is the header's."""
        if crc != self.crc:
            raise ProtocolError(f"corrupt {self.type.name} record ({self.length} bytes): "
                                "CRC mismatch")
