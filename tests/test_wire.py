"""Wire layer: framing, CRC, hello negotiation, page batches, verify tables, bad input."""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.contract import PAGE_SIZE
from livemig.migration import hello, pages, records, verify, wire
from livemig.migration.codecs import CodecSet
from livemig.migration.codecs.zero import ZeroCodec
from livemig.migration.errors import ConnectionLost, MigrationError, ProtocolError, VersionError
from livemig.migration.wire import RecordReader, RecordType


def pair() -> tuple[socket.socket, socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    srv.close()
    return a, b


def feed(data: bytes) -> RecordReader:
    a, b = pair()
    threading.Thread(target=lambda: (a.sendall(data), a.close()), daemon=True).start()
    return RecordReader(b)


def test_record_roundtrip_every_type() -> None:
    a, b = pair()
    r = RecordReader(b)
    for t in RecordType:
        body = bytes([t.value]) * (t.value * 100)
        wire.send_record(a, t, body[: len(body) // 2], body[len(body) // 2 :])
        rec = r.read()
        assert rec.type is t and bytes(rec.payload) == body


def test_payload_corruption_is_rejected() -> None:
    data = bytearray(b"".join(bytes(x) for x in wire.frame(RecordType.STATE, b"x" * 1000)))
    data[500] ^= 0x40
    with pytest.raises(ProtocolError, match="corrupt STATE record.*CRC"):
        feed(bytes(data)).read()


def test_header_corruption_is_rejected_before_reading_payload() -> None:
    data = bytearray(b"".join(bytes(x) for x in wire.frame(RecordType.PAGES, b"y" * 64)))
    data[5] ^= 0x01  # the length
    with pytest.raises(ProtocolError, match="corrupt record header"):
        feed(bytes(data)).read()


def _raw_header(rtype: int, length: int, flags: int = 0, magic: bytes = b"LM") -> bytes:
    head = struct.pack("<2sBBII", magic, rtype, flags, length, 0)
    import zlib

    return head + struct.pack("<I", zlib.crc32(head))


@pytest.mark.parametrize(
    ("head", "match"),
    [
        (_raw_header(99, 0), "unknown record type 99"),
        (_raw_header(1, 0, flags=1), "unknown flags"),
        (_raw_header(1, wire.MAX_PAYLOAD + 1), "oversized record"),
        (_raw_header(1, 0, magic=b"GE"), "bad record magic"),
    ],
)
def test_bad_headers(head: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        feed(head).read()


def test_truncated_record() -> None:
    data = b"".join(bytes(x) for x in wire.frame(RecordType.STATE, b"z" * 100))
    with pytest.raises(ConnectionLost, match="truncated"):
        feed(data[:60]).read()
    with pytest.raises(ConnectionLost, match="truncated"):
        feed(data[:7]).read()
    with pytest.raises(ConnectionLost, match="closed by peer"):
        feed(b"").read()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300))
def test_fuzzed_stream_only_raises_migration_errors(data: bytes) -> None:
    try:
        feed(data).read()
    except MigrationError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_payloads_only_raise_protocol_errors(data: bytes) -> None:
    for fn in (
        lambda: hello.Hello.decode(data),
        lambda: pages.decode(memoryview(data), 64, ALL),
        lambda: records.unpack(data, "X", ("a",)),
        lambda: verify.VerifyTable(4).add(memoryview(data)),
    ):
        try:
            fn()
        except ProtocolError:
            pass


def test_hello_negotiation() -> None:
    src = hello.Hello(encodings=["zero", "raw", "zstd"])
    dst = hello.Hello(features=[hello.FEATURE_ROUND_ACK], encodings=["raw", "zero"])
    chosen = hello.choose(hello.Hello.decode(src.encode()), dst)
    assert chosen.min_version == chosen.max_version == hello.PROTOCOL_VERSION
    assert chosen.features == [hello.FEATURE_ROUND_ACK]
    assert chosen.encodings == ["zero", "raw"]
    assert hello.check_welcome(hello.Hello.decode(chosen.encode()), src) == 1


def test_hello_version_mismatch() -> None:
    src = hello.Hello()
    with pytest.raises(VersionError, match="no common protocol version"):
        hello.choose(src, hello.Hello(min_version=5, max_version=7))
    with pytest.raises(VersionError, match="answered with protocol version 9"):
        hello.check_welcome(hello.Hello(9, 9), src)


def test_welcome_may_not_add_things() -> None:
    src = hello.Hello(encodings=["raw"])
    with pytest.raises(ProtocolError, match="never offered"):
        hello.check_welcome(hello.Hello(encodings=["raw", "zero"]), src)


ALL = CodecSet(["zero", "raw"])


def ram(npages: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    r = rng.integers(0, 256, size=(npages, PAGE_SIZE), dtype=np.uint8)
    r[::3] = 0
    return r




def test_page_batch_roundtrip() -> None:
    src = ram(100)
    idx = np.array([5, 3, 9, 0, 99, 42], dtype=np.int64)
    b = pages.BatchEncoder(src, ALL).encode(idx)
    assert (b.by_codec["zero"], b.by_codec["raw"]) == (5, 1)  # all but 5 are multiples of 3
    payload = memoryview(b.meta + b"".join(bytes(x) for x in b.data))
    dst = np.full_like(src, 0xAA)
    d = pages.decode(payload, 100, ALL)
    pages.apply(d, ALL, pages.RamPlacer(dst))
    assert np.array_equal(dst[idx], src[idx])
    assert d.count(ZeroCodec.id) == 5


def _batch(src: np.ndarray, idx: list[int]) -> bytearray:
    b = pages.BatchEncoder(src, ALL).encode(np.array(idx))
    return bytearray(b.meta + b"".join(bytes(x) for x in b.data))


def test_page_batch_rejections() -> None:
    src = ram(10)
    good = _batch(src, [1, 2, 3])
    with pytest.raises(ProtocolError, match="names page 3, RAM has 3"):
        pages.decode(memoryview(good), 3, ALL)
    with pytest.raises(ProtocolError, match="never negotiated"):
        pages.decode(memoryview(good), 10, CodecSet(["raw"]))
    bad = bytearray(good)
    bad[8 + 3 * 8 + 3 * 4] = 7  # first page's encoding byte: unknown encoding 7
    with pytest.raises(ProtocolError, match=r"encoding\(s\) \[7\]"):
        pages.decode(memoryview(bad), 10, ALL)
    with pytest.raises(ProtocolError, match="data is"):
        pages.decode(memoryview(good[:-1]), 10, ALL)
    with pytest.raises(ProtocolError, match="truncated"):
        pages.decode(memoryview(good[:20]), 10, ALL)
    bad = bytearray(good)
    struct.pack_into("<I", bad, 0, 5000)
    with pytest.raises(ProtocolError, match="bad header"):
        pages.decode(memoryview(bad), 10, ALL)
    bad = bytearray(good)
    struct.pack_into("<I", bad, 8 + 3 * 8, 17)  # first page's length
    with pytest.raises(ProtocolError, match="length does not fit"):
        pages.decode(memoryview(bad), 10, ALL)


def test_verify_table() -> None:
    src = ram(40)
    key = verify.new_key()
    dig = verify.page_digests(src, key)
    t = verify.VerifyTable(40)
    for first in range(0, 40, 16):
        bufs = verify.encode(key, first, dig[first : first + 16])
        t.add(memoryview(b"".join(bytes(x) for x in bufs)))
    dst = src.copy()
    assert t.check(dst) is None
    dst[17, 100] ^= 1
    assert "1 page(s) differ" in str(t.check(dst)) and "page 17" in str(t.check(dst))
    assert "incomplete" in str(verify.VerifyTable(40).check(dst))


def test_verify_key_matters() -> None:
    src = ram(4)
    assert not np.array_equal(
        verify.page_digests(src, b"a" * 32), verify.page_digests(src, b"b" * 32)
    )


def test_reader_limit_is_enforced_before_the_payload() -> None:
    """A 2 MiB record on a reader limited to 1 MiB (the return path) is "too large", not a
    CRC mismatch, and nothing of its payload is read."""
    a, b = socket.socketpair()
    wire.send_record(a, RecordType.REPORT, bytes(2 << 20)[: 64 << 10])  # header says 64 KiB
    r = RecordReader(b, max_payload=1 << 20)
    assert r.read().type is RecordType.REPORT
    head = wire.header(RecordType.REPORT, 2 << 20, 0)
    a.sendall(head)
    with pytest.raises(ProtocolError, match="too large"):
        r.read()
    assert r.bytes_read == wire.HEADER_SIZE * 2 + (64 << 10)
