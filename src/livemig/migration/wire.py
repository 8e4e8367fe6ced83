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
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from zlib_ng import zlib_ng as zlib  # same CRC-32 as zlib, SIMD-accelerated

from livemig.migration.errors import ConnectionLost, ProtocolError

MAGIC = b"LM"
HEADER = struct.Struct("<2sBBIII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 16 << 20  # 16 MiB: a page batch, a state or a verify table fits


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


def send_buffers(sock: socket.socket, bufs: Sequence[bytes | memoryview]) -> int:
    """Send every byte of `bufs` with as few `sendmsg` calls as the kernel allows."""
    views = [memoryview(b).cast("B") for b in bufs if memoryview(b).nbytes]
    total = sum(v.nbytes for v in views)
    try:
        while views:
            n = sock.sendmsg(views[:512])
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


def parse_header(head: bytes | memoryview) -> tuple[RecordType, int, int]:
    """Check a header and return (type, length, payload_crc); ProtocolError if bad."""
    magic, rtype, flags, length, pcrc, hcrc = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"bad record magic {bytes(magic)!r}: not a livemig migration stream")
    if zlib.crc32(head[:12]) != hcrc:
        raise ProtocolError("corrupt record header (header CRC mismatch)")
    if rtype not in RecordType._value2member_map_:
        raise ProtocolError(f"unknown record type {rtype}")
    if flags != 0:
        raise ProtocolError(f"record {RecordType(rtype).name} has unknown flags {flags:#x}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"oversized record: {length} bytes, the limit is {MAX_PAYLOAD}")
    return RecordType(rtype), length, pcrc


class RecordReader:
    """Reads whole records from a socket into one reusable buffer."""

    def __init__(self, sock: socket.socket, max_payload: int = MAX_PAYLOAD) -> None:
        self.sock = sock
        self.max_payload = max_payload
        self._buf = bytearray(HEADER_SIZE + max_payload)
        self._view = memoryview(self._buf)
        self.bytes_read = 0

    def _fill(self, view: memoryview, what: str) -> None:
        got = 0
        while got < view.nbytes:
            try:
                n = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise
            except OSError as e:
                raise ConnectionLost(f"connection lost while reading {what}: {e}") from e
            if n == 0:
                if got == 0 and what == "record header":
                    raise ConnectionLost("connection closed by peer")
                raise ConnectionLost(f"connection closed in the middle of {what} (truncated)")
            got += n
        self.bytes_read += got

    def read(self) -> Record:
        """Block until one whole, checked record has arrived; the payload is valid until the
        next call. Raises ProtocolError on bad input and ConnectionLost on EOF."""
        head = self._view[:HEADER_SIZE]
        self._fill(head, "record header")
        rtype, length, pcrc = parse_header(head)
        payload = self._view[HEADER_SIZE : HEADER_SIZE + length]
        self._fill(payload, f"{rtype.name} record")
        if zlib.crc32(payload) != pcrc:
            raise ProtocolError(f"corrupt {rtype.name} record ({length} bytes): CRC mismatch")
        return Record(rtype, payload)
