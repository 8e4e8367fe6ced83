"""The `sparse` codec (offered with `--xbzrle`): a mostly-zero page as its runs of non-zero
bytes, decoded onto a zero page whatever the destination held (docs/protocol.md, "Page
batches"). Round trips, dense pages left alone, the decoder fuzzed, batches through the
encoder and decoder, and a whole migration checked with --verify-memory."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as hs
from test_codec_xbzrle import Pair, Placer, SparseWriter, delta
from test_migrate_engine import Dest, connect, source

from livemig.contract import PAGE_SIZE
from livemig.migration import MigrationOptions, migrate
from livemig.migration.codecs import BY_NAME, offered
from livemig.migration.codecs.sparse import SparseCodec
from livemig.migration.errors import ProtocolError

NAMES = ("zero", "sparse", "raw")


def sparse_pages(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pages = np.zeros((n, PAGE_SIZE), np.uint8)
    for i in range(n):
        for _ in range(int(rng.integers(1, 6))):
            at = int(rng.integers(0, PAGE_SIZE - 40))
            pages[i, at : at + int(rng.integers(1, 40))] = rng.integers(1, 256)
    return pages


def test_offered_with_xbzrle_only() -> None:
    assert "sparse" not in offered(MigrationOptions())
    assert "sparse" in offered(MigrationOptions(xbzrle=True))
    assert BY_NAME["sparse"].id == 6


def test_sparse_pages_go_sparse_dense_ones_raw_whatever_the_destination_held() -> None:
    p = Pair(names=NAMES)
    p.src[:32] = sparse_pages(32, 1)
    p.src[32:] = np.random.default_rng(2).integers(1, 256, (32, PAGE_SIZE), dtype=np.uint8)
    p.dst[:] = 0x77  # stale content: a sparse page replaces all of it
    assert p.send(np.arange(64)) == {"sparse": 32, "raw": 32}
    assert np.array_equal(p.dst, p.src)
    assert p.wire < 33 * PAGE_SIZE + 32 * 300


def _fuzz(lens: list[int], data: bytes) -> None:
    base = np.full((len(lens), PAGE_SIZE), 0x55, np.uint8)
    ram = base.copy()
    placer = Placer(ram)
    codec = SparseCodec()
    lens_a = np.array(lens, dtype=np.uint32)
    if codec.check(lens_a) is not None or sum(lens) != len(data):
        return  # pages.decode refuses the batch before the codec sees it
    try:
        codec.place(np.arange(len(lens)), lens_a, memoryview(data), placer, None)
    except ProtocolError:
        assert placer.stores == 0 and np.array_equal(ram, base)
        return
    assert placer.stores == 1


@settings(max_examples=1000, deadline=None)
@given(hs.lists(hs.binary(min_size=1, max_size=64), min_size=1, max_size=6))
def test_decoder_fuzz_random_bytes(chunks: list[bytes]) -> None:
    _fuzz([len(c) for c in chunks], b"".join(chunks))


@settings(max_examples=1000, deadline=None)
@given(hs.data())
def test_decoder_fuzz_mutated_deltas(data: Any) -> None:
    parts = [delta(data.draw(hs.lists(hs.tuples(hs.integers(0, 300),
                                                hs.binary(min_size=1, max_size=40)),
                                      min_size=1, max_size=5)))
             for _ in range(data.draw(hs.integers(1, 4)))]
    buf = bytearray(b"".join(parts))
    lens = [len(p) for p in parts]
    if data.draw(hs.booleans()):
        i = data.draw(hs.integers(0, len(buf) - 1))
        buf[i] = data.draw(hs.integers(0, 255))
    _fuzz(lens, bytes(buf))


def test_live_migration_through_sparse_is_verified() -> None:
    """A running MemoryMachine whose written pages hold a few bytes each: they go sparse
    (misses of the xbzrle cache included), and --verify-memory finds RAM equal."""
    src = source()
    n = len(src.memory.pages)
    src.memory.pages[: n // 2] = 0
    src.memory.pages[: n // 2 : 3, 100] = 1
    w = SparseWriter(src, np.arange(0, n // 2, 2))
    time.sleep(0.05)
    d = Dest()
    stats = migrate(src, connect(d.addr), MigrationOptions(xbzrle=True, xbzrle_cache=1 << 20,
                                                           verify_memory=True))
    w.stop.set()
    w.thread.join(5)
    d.join()
    assert d.error is None and d.machine is not None and stats.verified_memory
    assert np.array_equal(d.machine.memory.pages, src.memory.pages)
    assert stats.to_json()["codecs"]["sparse"]["pages"] > 0
