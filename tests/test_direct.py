"""Receiving PAGES straight into RAM (direct.py): scattered runs, mixed codecs, a damaged
record refused by its CRC."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from livemig.contract import PAGE_SIZE
from livemig.migration import wire
from livemig.migration.codecs import CodecSet
from livemig.migration.direct import DirectReceiver
from livemig.migration.errors import ProtocolError
from livemig.migration.pages import BatchEncoder, RamPlacer, apply

NPAGES = 2048


def _ram(seed: int) -> np.ndarray:
    ram = np.random.default_rng(seed).integers(0, 256, (NPAGES, PAGE_SIZE), dtype=np.uint8)
    ram[5] = 0  # a zero page among the raw ones
    return ram


def _send(idx: np.ndarray, damage_at: int | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                   Exception | None]:
    src = _ram(1)
    enc = BatchEncoder(src, CodecSet(["zero", "raw", "zstd"]))
    batch = enc.encode(idx)
    payload = bytearray(batch.meta + b"".join(bytes(d) for d in batch.data))
    bufs = wire.frame(wire.RecordType.PAGES, bytes(payload))
    if damage_at is not None:
        payload[damage_at] ^= 0x40
        bufs = [bufs[0], bytes(payload)]
    dst = np.zeros_like(src)
    codecs = CodecSet(["zero", "raw", "zstd"])
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=wire.send_buffers, args=(a, bufs))
        sender.start()
        reader = wire.RecordReader(b)
        try:
            got = DirectReceiver(dst, codecs).read(reader, reader.read_header(), None)
            apply(got, codecs, RamPlacer(dst))
        except ProtocolError as e:
            return src, dst, e
        finally:
            sender.join()
    return src, dst, None


@pytest.mark.parametrize("pattern", ["run", "scattered", "descending"])
def test_direct_receive_places_every_page(pattern: str) -> None:
    idx = {"run": np.arange(100, 612), "scattered": np.arange(0, 2048, 5)[:400],
           "descending": np.arange(900, 400, -3)}[pattern].astype(np.int64)
    src, dst, err = _send(idx)
    assert err is None
    assert np.array_equal(dst[idx], src[idx])
    others = np.setdiff1d(np.arange(NPAGES), idx)
    assert not dst[others].any()


def test_direct_receive_refuses_a_damaged_raw_page() -> None:
    idx = np.arange(10, 60)
    _src, _dst, err = _send(idx, damage_at=8 + 13 * len(idx) + 3 * PAGE_SIZE + 17)
    assert isinstance(err, ProtocolError) and "CRC mismatch" in str(err)


def test_direct_receive_with_deltas_after_raw_pages() -> None:
    """A batch of raw pages and XBZRLE deltas: the raw ones go straight into RAM, the deltas
    are decoded from the buffer against what RAM holds."""
    from livemig.migration.options import MigrationOptions

    names = ["zero", "raw", "xbzrle"]
    src = _ram(2)
    enc = BatchEncoder(src, CodecSet(names, MigrationOptions(xbzrle=True)))
    codecs = CodecSet(names)
    codecs.configure(enc.codecs.params())
    dst = np.zeros_like(src)
    first = np.arange(0, 256)
    src_again = np.concatenate((np.arange(0, 256, 2), np.arange(300, 400)))
    a, b = socket.socketpair()
    with a, b:
        reader = wire.RecordReader(b)
        receiver = DirectReceiver(dst, codecs)
        for idx in (first, src_again):
            src[idx[:100], 7] += 1  # the pages sent again changed a little: deltas
            batch = enc.encode(idx)
            sender = threading.Thread(target=wire.send_buffers, args=(
                a, wire.frame(wire.RecordType.PAGES, batch.meta, *batch.data)))
            sender.start()
            got = receiver.read(reader, reader.read_header(), None)
            apply(got, codecs, RamPlacer(dst))
            sender.join()
            enc.release(batch)
        assert got.count(2) > 0 and got.count(1) > 0
    seen = np.union1d(first, src_again)
    assert np.array_equal(dst[seen], src[seen])
