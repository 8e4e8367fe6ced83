"""The `xbzrle` codec (`--xbzrle`): a page sent again goes as a delta against the copy the
destination holds (docs/protocol.md, "Page batches").

The delta format on its own (round trips, malformed deltas, the decoder fuzzed); batches
encoded and decoded as the source and the destination do (BatchEncoder, pages.decode,
pages.apply into a RamPlacer), with the source's cache learning every page whatever codec
sends it; the cache's bound; then whole migrations of a MemoryMachine with a writer (engine)
and of a real `verify` guest (KVM).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import migrate_verify_guest, needs_kvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from memmachine import MemoryMachine
from test_migrate_engine import Dest, connect, source

from livemig.contract import PAGE_SIZE
from livemig.migration import MigrationOptions, Mode, migrate
from livemig.migration.codecs import BY_NAME, REGISTRY, CodecSet, offered
from livemig.migration.codecs.xbzrle import (
    OVERFLOW,
    XbzrleCache,
    XbzrleCodec,
    encode,
    parse,
)
from livemig.migration.errors import ProtocolError
from livemig.migration.pages import BatchEncoder, RamPlacer, apply, decode

RNG = np.random.default_rng(9)


def rand_pages(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)


def uleb(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def delta(runs: list[tuple[int, bytes]]) -> bytes:
    """A delta by hand: (skip, new bytes) per run."""
    head = uleb(len(runs)) + b"".join(uleb(s) + uleb(len(b)) for s, b in runs)
    return head + b"".join(b for _, b in runs)


class Placer:
    """A RamPlacer that remembers whether anything was written."""

    def __init__(self, ram: np.ndarray) -> None:
        self.ram = ram
        self.inner = RamPlacer(ram)
        self.stores = 0

    def zero(self, idx: np.ndarray) -> None:
        self.stores += 1
        self.inner.zero(idx)

    def store(self, idx: np.ndarray, data: np.ndarray) -> None:
        self.stores += 1
        self.inner.store(idx, data)

    def current(self, idx: np.ndarray) -> np.ndarray:
        return self.inner.current(idx)


def place(lens: list[int], data: bytes, base: np.ndarray) -> np.ndarray:
    """Decode deltas as the destination does (check, then place) against copies of `base`."""
    ram = base.copy()
    codec = XbzrleCodec()
    lens_a = np.array(lens, dtype=np.uint32)
    problem = codec.check(lens_a)
    if problem:
        raise ProtocolError(problem)
    codec.place(np.arange(len(lens)), lens_a, memoryview(data), Placer(ram), None)
    return ram


def round_trip(cur: np.ndarray, old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok, lens, data = encode(cur, old)
    assert int(lens.sum()) == len(data) and np.all(lens < OVERFLOW) and np.all(lens >= 1)
    got = place(lens.tolist(), data.tobytes(), old[ok])
    assert np.array_equal(got, cur[ok])
    return ok, lens


# --- the delta format ---------------------------------------------------------------------


def test_sparse_changes_first_and_last_bytes_round_trip() -> None:
    old = rand_pages(6)
    cur = old.copy()
    cur[0, 0] ^= 1  # first byte
    cur[1, PAGE_SIZE - 1] ^= 1  # last byte
    cur[2, [0, PAGE_SIZE - 1]] ^= 0xFF  # both
    cur[3, 100:140] = 7  # one run (maybe a byte of it unchanged)
    cur[4, ::97] += 1  # many small runs
    ok, lens = round_trip(cur, old)  # page 5 is unchanged
    assert ok.all()
    assert lens[5] == 1  # r = 0
    assert lens[0] == 1 + 2 + 1 and lens[1] == 1 + 3 + 1  # skip 4095 takes 2 bytes
    assert lens[4] == 1 + 43 * 3  # 43 runs of 1 byte, each with 2 one-byte lengths


def test_random_sparse_deltas_round_trip() -> None:
    old = rand_pages(512, 2)
    cur = old.copy()
    for i in range(512):
        n = int(RNG.integers(0, 200))
        pos = RNG.integers(0, PAGE_SIZE, n)
        cur[i, pos] = RNG.integers(0, 256, n)
    ok, _ = round_trip(cur, old)
    assert ok.all()


def test_every_other_word_and_short_gaps() -> None:
    old = rand_pages(4, 3)
    cur = old.copy()
    w = cur.view(np.uint64)
    w[0, ::2] = ~w[0, ::2]  # every other word: 256 runs of 8 bytes
    w[1, ::2] += 1  # low byte (mostly) of every other word
    cur[2, 0:200:2] ^= 1  # every other byte: gaps of 1 are sent inside one run
    cur[3, 0:300:3] ^= 1  # every third byte: gaps of 2 too
    ok, lens = round_trip(cur, old)
    assert ok.all()
    assert lens[0] == 2 + 256 * 2 + 2048  # r = 256 (2 bytes), 256 x (skip, len), new bytes
    assert lens[2] == 1 + 1 + 2 + 199 and lens[3] == 1 + 1 + 2 + 298  # one run each


def test_all_different_pages_overflow() -> None:
    old = rand_pages(3, 4)
    cur = old ^ 0xFF
    cur[1, ::2] = old[1, ::2]  # every other byte: one run of 4095 bytes, gaps included
    ok, _ = round_trip(cur, old)
    assert not ok.any()
    # a delta just under the limit is sent, one at it is not
    near = old.copy()
    near[0, : OVERFLOW - 6] ^= 1  # one run: r, skip 0, len (2 bytes), bytes = OVERFLOW - 2
    near[1, : OVERFLOW - 4] ^= 1  # OVERFLOW bytes
    ok, lens = round_trip(near, old)
    assert ok[0] and lens[0] == OVERFLOW - 2 and not ok[1]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.data())
def test_round_trip_property(data: Any) -> None:
    seed = data.draw(hs.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    k = data.draw(hs.integers(1, 8))
    old = rng.integers(0, 256, (k, PAGE_SIZE), dtype=np.uint8)
    cur = old.copy()
    for i in range(k):
        for _ in range(data.draw(hs.integers(0, 12))):
            a = data.draw(hs.integers(0, PAGE_SIZE - 1))
            b = data.draw(hs.integers(a + 1, min(PAGE_SIZE, a + 600)))
            cur[i, a:b] = rng.integers(0, 256, b - a, dtype=np.uint8)
    round_trip(cur, old)


# --- malformed deltas -----------------------------------------------------------------------


@pytest.mark.parametrize("raw,why", [
    (delta([(4000, b"x" * 97)]), "past the end"),  # runs past 4096
    (delta([(0, b"a"), (4095, b"b")]), "past the end"),
    (b"\x80", "truncated"),  # r's ULEB cut
    (b"\x01\x05", "truncated"),  # r = 1, the lengths cut
    (b"\x01\x05\x81", "truncated"),
    (delta([(3, b"abc")]) + b"!", "new bytes"),  # trailing bytes
    (delta([(3, b"abc")])[:-1], "new bytes"),  # new bytes missing
    (b"\x00\x00", "new bytes"),  # r = 0 and a byte after it
    (b"\x01\x80\x80\x01\x01z", "longer than 2 bytes"),
    (b"\x01\x00\x00", "empty run"),
    (b"\xff\x7f", "more runs"),
])
def test_malformed_deltas_are_refused(raw: bytes, why: str) -> None:
    base = rand_pages(1, 5)
    placer = Placer(base.copy())
    with pytest.raises(ProtocolError, match=why):
        XbzrleCodec().place(np.array([0]), np.array([len(raw)], np.uint32), memoryview(raw),
                            placer, None)
    assert placer.stores == 0 and np.array_equal(placer.ram, base)


def test_check_refuses_empty_and_oversized_lengths() -> None:
    c = XbzrleCodec()
    assert c.check(np.array([1, 4096], np.uint32)) is None
    assert c.check(np.array([1, 0], np.uint32)) is not None
    assert c.check(np.array([4097], np.uint32)) is not None


def test_one_bad_delta_keeps_the_whole_batch_out() -> None:
    base = rand_pages(3, 6)
    good = delta([(5, b"hello")])
    bad = delta([(4090, b"too long")])
    placer = Placer(base.copy())
    data = good + bad + good
    with pytest.raises(ProtocolError):
        XbzrleCodec().place(np.arange(3), np.array([len(good), len(bad), len(good)], np.uint32),
                            memoryview(data), placer, None)
    assert placer.stores == 0 and np.array_equal(placer.ram, base)


def _fuzz(lens: list[int], data: bytes) -> None:
    base = rand_pages(len(lens), 7) if lens else np.zeros((0, PAGE_SIZE), np.uint8)
    ram = base.copy()
    placer = Placer(ram)
    codec = XbzrleCodec()
    lens_a = np.array(lens, dtype=np.uint32)
    if codec.check(lens_a) is not None or sum(lens) != len(data):
        return  # pages.decode refuses the batch before the codec sees it
    try:
        codec.place(np.arange(len(lens)), lens_a, memoryview(data), placer, None)
    except ProtocolError:
        assert placer.stores == 0 and np.array_equal(ram, base)


@settings(max_examples=1500, deadline=None)
@given(hs.lists(hs.binary(min_size=1, max_size=64), min_size=1, max_size=6))
def test_decoder_fuzz_random_bytes(chunks: list[bytes]) -> None:
    _fuzz([len(c) for c in chunks], b"".join(chunks))


@settings(max_examples=1500, deadline=None)
@given(hs.data())
def test_decoder_fuzz_mutated_deltas(data: Any) -> None:
    """Valid deltas, then bytes changed, cut, added, and the lengths split elsewhere."""
    k = data.draw(hs.integers(1, 4))
    parts = []
    for _ in range(k):
        runs = data.draw(hs.lists(hs.tuples(hs.integers(0, 300), hs.binary(min_size=1,
                                                                         max_size=40)),
                                  max_size=5))
        parts.append(delta(runs))
    buf = bytearray(b"".join(parts))
    lens = [len(p) for p in parts]
    for _ in range(data.draw(hs.integers(0, 3))):
        op = data.draw(hs.sampled_from(["flip", "cut", "add", "move"]))
        if op == "flip" and buf:
            i = data.draw(hs.integers(0, len(buf) - 1))
            buf[i] = data.draw(hs.integers(0, 255))
        elif op == "cut" and lens[-1] > 1:
            buf.pop()
            lens[-1] -= 1
        elif op == "add":
            buf.append(data.draw(hs.integers(0, 255)))
            lens[-1] += 1
        elif op == "move" and len(lens) > 1 and lens[0] > 1:
            lens[0] -= 1
            lens[1] += 1
    _fuzz(lens, bytes(buf))


def test_parse_on_arbitrary_bytes_writes_only_inside_pages() -> None:
    rng = np.random.default_rng(11)
    for _ in range(300):
        n = int(rng.integers(1, 5))
        lens = rng.integers(1, 30, n)
        data = rng.integers(0, 256, int(lens.sum()), dtype=np.uint8)
        data[np.cumsum(lens) - lens] = rng.integers(0, 4, n)  # plausible run counts
        try:
            dst, src = parse(lens, data)
        except ProtocolError:
            continue
        assert np.all(dst < n * PAGE_SIZE) and np.all(src < len(data))


# --- batches, as the source and the destination do them ----------------------------------


class Pair:
    """A source encoder and a destination RAM, with one session's codec state on each side."""

    def __init__(self, npages: int = 64, names: tuple[str, ...] = ("zero", "raw", "xbzrle"),
                 opts: MigrationOptions | None = None) -> None:
        self.src = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
        self.dst = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
        self.scodecs = CodecSet(names, opts or MigrationOptions(xbzrle=True))
        self.dcodecs = CodecSet(names)
        self.dcodecs.configure(self.scodecs.params())
        self.enc = BatchEncoder(self.src, self.scodecs)
        self.placer = RamPlacer(self.dst)
        self.wire = 0

    @property
    def cache(self) -> XbzrleCache:
        st = self.scodecs.state[XbzrleCodec.id]
        assert isinstance(st, XbzrleCache)
        return st

    def send(self, idx: Any) -> dict[str, int]:
        b = self.enc.encode(np.asarray(idx, dtype=np.int64))
        payload = b.meta + b"".join(bytes(d) for d in b.data)
        self.enc.release(b)
        self.wire += len(payload)
        batch = decode(memoryview(payload), len(self.dst), self.dcodecs)
        apply(batch, self.dcodecs, self.placer)
        assert np.array_equal(self.dst[idx], self.src[idx])
        return dict(b.by_codec)


def test_registry_offers_xbzrle_only_when_asked_and_tries_it_first() -> None:
    assert "xbzrle" not in offered(MigrationOptions())
    assert "xbzrle" in offered(MigrationOptions(xbzrle=True))
    assert BY_NAME["xbzrle"].id == 2
    assert REGISTRY[0].name == "xbzrle" and REGISTRY[-1].name == "raw"


def test_pages_sent_again_go_as_deltas() -> None:
    p = Pair()
    p.src[:] = rand_pages(64, 12)
    assert p.send(np.arange(64)) == {"raw": 64}  # all misses, now cached
    p.src[:, 100] += 1
    p.src[:32, 4000:4010] = 9
    got = p.send(np.arange(64))
    assert got == {"xbzrle": 64}  # every page changed a little: all go as deltas
    st = XbzrleCodec().stats(p.cache)
    assert st["hits"] == 64 and st["misses"] == 64 and st["overflows"] == 0
    assert st["bytes_saved"] > 60 * (PAGE_SIZE - 20)
    p.src[10:20] ^= 0xFF  # rewritten whole: overflows, sent raw, cached again
    p.src[30, 7] += 1
    assert p.send(np.arange(10, 31)) == {"raw": 10, "xbzrle": 11}
    assert XbzrleCodec().stats(p.cache)["overflows"] == 10
    p.src[10:20, 0] += 1
    assert p.send(np.arange(10, 20)) == {"xbzrle": 10}


def test_pages_taken_by_other_codecs_are_learnt() -> None:
    """A page that went as zero, raw or through another codec is the base of its next delta:
    also when a whole batch is zero pages (every codec sees every batch)."""
    p = Pair()
    p.src[:16] = rand_pages(16, 13)
    p.send(np.arange(16))
    p.src[:8] = 0  # a batch of zero pages only
    assert p.send(np.arange(8)) == {"zero": 8}
    p.src[:8, 5] = 1  # a few bytes on a zero page: a delta against zeros
    p.src[8:16, 5] += 1
    assert p.send(np.arange(16)) == {"xbzrle": 16}
    assert np.array_equal(p.dst, p.src)


def test_with_dedup_every_codec_sees_every_batch() -> None:
    if "dedup" not in BY_NAME:
        pytest.skip("no dedup codec in this tree")
    names = ("zero", "raw", "xbzrle", "dedup")
    p = Pair(names=names, opts=MigrationOptions(xbzrle=True, dedup=True))
    p.src[:32] = rand_pages(32, 14)
    p.send(np.arange(32))
    for step in range(4):  # hot pages with small changes, copies of other pages, zeros
        p.src[:32, step] += 1
        p.src[32 + step] = p.src[step]
        p.src[40 + step] = 0
        p.send(np.arange(32))
        p.send(np.arange(32, 48))
    assert np.array_equal(p.dst, p.src)


def test_cache_holds_at_most_its_limit_and_what_the_destination_holds() -> None:
    rng = np.random.default_rng(15)
    for limit in (0, 100, 3 * PAGE_SIZE + 5, 37 * PAGE_SIZE + 100, 1 << 20):
        st = XbzrleCache(limit)
        codec = XbzrleCodec()
        model: dict[int, np.ndarray] = {}
        ram = rand_pages(300, 16)
        for _ in range(60):
            n = int(rng.integers(1, 513))
            idx = np.sort(rng.choice(300, size=min(n, 300), replace=False))
            change = rng.random(len(idx)) < 0.5
            ram[idx[change], rng.integers(0, PAGE_SIZE)] += 1
            ram[idx[rng.random(len(idx)) < 0.05]] = 0
            pages = ram[idx].copy()
            codec.claim(idx, pages, np.ones(len(idx), bool), st)
            for i, p in enumerate(idx.tolist()):
                model[p] = pages[i]
            assert st.cached_bytes <= limit and st.data.nbytes <= limit
            held = np.flatnonzero(st.page_slot >= 0)
            for p in held.tolist():
                s = int(st.page_slot[p])
                assert st.slot_page[s] == p and np.array_equal(st.data[s], model[p])
            for p in np.flatnonzero(st.page_slot == -2).tolist():
                assert not model[p].any()
        stats = codec.stats(st)
        assert stats["cache_bytes"] <= limit
        if limit >= 1 << 20:
            assert stats["hits"] > 0


# --- whole migrations -----------------------------------------------------------------------


class SparseWriter:
    """Writes a few bytes on each of `pages` of a running MemoryMachine, a burst at a time,
    marking them dirty, as a guest updating counters would."""

    def __init__(self, m: MemoryMachine, pages: np.ndarray, burst: int = 256,
                 pause: float = 0.001) -> None:
        self.m, self.pages, self.burst, self.pause = m, pages, burst, pause
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pos, n = 0, 0
        mem = self.m.memory
        while not self.stop.is_set():
            with self.m.vcpu_lock:
                if self.m.running:
                    idx = np.take(self.pages, np.arange(pos, pos + self.burst), mode="wrap")
                    pos = (pos + self.burst) % len(self.pages)
                    n += 1
                    off = (n * 8) % PAGE_SIZE
                    mem.pages[idx, off : off + 8] = n & 0xFF  # 8 bytes of the page
                    mem.pages[idx, 64] += 1
                    with mem._lock:
                        mem._dirty[idx] = True
                    self.m.counter += 1
            time.sleep(self.pause / max(0.01, 1 - self.m.throttle))


def migrate_with_writer(opts: MigrationOptions) -> tuple[Any, MemoryMachine, Dest]:
    src = source()
    w = SparseWriter(src, np.arange(0, len(src.memory.pages) // 2, 2))
    time.sleep(0.05)
    d = Dest()
    stats = migrate(src, connect(d.addr), opts)
    w.stop.set()
    w.thread.join(5)
    d.join()
    return stats, src, d


@pytest.mark.parametrize("mode", [Mode.PRECOPY, Mode.STOP_COPY])
def test_live_migration_with_xbzrle(mode: Mode) -> None:
    stats, src, d = migrate_with_writer(MigrationOptions(mode=mode, xbzrle=True,
                                                         verify_memory=True))
    assert d.error is None and d.machine is not None
    assert np.array_equal(d.machine.memory.pages, src.memory.pages)
    assert d.machine.counter == src.counter
    assert stats.status == "completed" and stats.verified_memory
    codecs = stats.to_json()["codecs"]
    if mode is Mode.PRECOPY:
        assert len(stats.rounds) >= 2
        x = codecs["xbzrle"]
        assert x["hits"] > 0 and x["pages"] > 0 and x["bytes_saved"] > 0
        assert x["cache_bytes"] <= MigrationOptions().xbzrle_cache
    else:
        assert codecs.get("xbzrle", {}).get("pages", 0) == 0  # one round: nothing sent twice


def test_live_migration_with_a_tiny_cache() -> None:
    """A cache of 1 MiB for 16 MiB of written pages: misses and evictions, memory equal."""
    stats, src, d = migrate_with_writer(MigrationOptions(xbzrle=True, xbzrle_cache=1 << 20,
                                                         verify_memory=True))
    assert d.error is None and d.machine is not None
    assert np.array_equal(d.machine.memory.pages, src.memory.pages)
    x = stats.codec_counters["xbzrle"]
    assert x["misses"] > 0 and x["cache_bytes"] <= 1 << 20


@needs_kvm
def test_live_migration_of_a_verify_guest_with_xbzrle(machines, tmp_path: Path) -> None:
    migrate_verify_guest(machines, tmp_path, "--xbzrle")
