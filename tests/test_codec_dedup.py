"""The `dedup` codec (`--dedup`): a page whose content the destination already holds goes as a
reference to that page, checked at the destination with the migration's keyed BLAKE3 digest.

Batches are encoded and decoded here as the source and the destination do (BatchEncoder,
pages.decode, pages.apply into a RamPlacer); then whole migrations of a MemoryMachine (engine)
and of a real `verify` guest (KVM).
"""

from __future__ import annotations

from pathlib import Path

import blake3
import numpy as np
import pytest
from conftest import migrate_verify_guest, needs_kvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from memmachine import MemoryMachine, memory_config
from test_migrate_engine import Dest, Guest, connect

from livemig.contract import PAGE_SIZE
from livemig.migration import MigrationOptions, Mode, migrate
from livemig.migration.codecs import BY_NAME, REGISTRY, CodecSet, offered
from livemig.migration.codecs.dedup import REF_SIZE, DedupCodec, DestState, SourceState
from livemig.migration.errors import ProtocolError
from livemig.migration.pages import BatchEncoder, RamPlacer, apply, decode

NAMES = ["zero", "raw", "dedup"]
NPAGES = 64


class Pair:
    """A source encoder and a destination RAM, with the codec state of one session each."""

    def __init__(self, npages: int = NPAGES, names: list[str] = NAMES,
                 opts: MigrationOptions | None = None) -> None:
        self.src = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
        self.dst = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
        self.scodecs = CodecSet(names, opts or MigrationOptions(dedup=True))
        self.dcodecs = CodecSet(names)
        self.dcodecs.configure(self.scodecs.params())
        self.enc = BatchEncoder(self.src, self.scodecs)
        self.placer = RamPlacer(self.dst)

    @property
    def key(self) -> bytes:
        return bytes(self.scodecs.params()["dedup"]["key"])

    def encode(self, idx: list[int]) -> tuple[bytes, dict[str, int]]:
        b = self.enc.encode(np.array(idx, dtype=np.int64))
        payload = b.meta + b"".join(bytes(d) for d in b.data)
        self.enc.release(b)
        return payload, dict(b.by_codec)

    def receive(self, payload: bytes) -> None:
        batch = decode(memoryview(payload), len(self.dst), self.dcodecs)
        apply(batch, self.dcodecs, self.placer)

    def send(self, idx: list[int]) -> dict[str, int]:
        payload, by_codec = self.encode(idx)
        self.receive(payload)
        return by_codec


def fill(ram: np.ndarray, page: int, content: int) -> None:
    """Page `page` gets a pattern that identifies `content` (never all zero)."""
    ram[page] = np.random.default_rng(content).integers(1, 256, PAGE_SIZE, dtype=np.uint8)


def refs_of(payload: bytes, n: int) -> list[tuple[int, int]]:
    """(referencing page, referenced page) of a batch's dedup pages (their data comes last)."""
    idx = np.frombuffer(payload, "<u8", n, 8)
    ids = np.frombuffer(payload, np.uint8, n, 8 + 12 * n)
    mine = idx[ids == DedupCodec.id]
    tail = payload[len(payload) - len(mine) * REF_SIZE:]
    return [(int(p), int.from_bytes(tail[k * REF_SIZE : k * REF_SIZE + 8], "little"))
            for k, p in enumerate(mine)]


# -- registry, options, key ---------------------------------------------------------------------


def test_registered_and_offered_only_when_asked() -> None:
    assert BY_NAME["dedup"].id == 5 and BY_NAME["dedup"] in REGISTRY
    assert "dedup" in offered(MigrationOptions(dedup=True))
    assert "dedup" not in offered(MigrationOptions())


def test_key_is_fresh_full_and_required() -> None:
    c = DedupCodec()
    a, b = c.new_state(MigrationOptions(dedup=True), None), c.new_state(MigrationOptions(), None)
    assert isinstance(a, SourceState) and isinstance(b, SourceState)
    pa, pb = c.params(a), c.params(b)
    assert pa is not None and pb is not None
    ka, kb = pa["key"], pb["key"]
    assert len(ka) == len(kb) == 32 and ka != kb
    assert c.new_state(None, {"key": ka}) == DestState(ka)
    for bad in ({}, {"key": ka[:16]}, {"key": ka + b"x"}, {"key": "a" * 32}, {"key": None}):
        with pytest.raises(ProtocolError, match="dedup key"):
            c.new_state(None, bad)
    d = CodecSet(NAMES)
    with pytest.raises(ProtocolError, match="dedup key"):
        d.configure({"dedup": {}})


def test_reference_without_a_key_is_refused() -> None:
    p = Pair()
    p.dcodecs = CodecSet(NAMES)  # a CONFIG without codec parameters
    p.dcodecs.configure({})
    fill(p.src, 0, 1)
    fill(p.src, 1, 1)
    p.send([0])
    payload, by_codec = p.encode([1])
    assert by_codec == {"dedup": 1}
    with pytest.raises(ProtocolError, match="no dedup key"):
        p.receive(payload)


# -- encoding and placing ------------------------------------------------------------------------


def test_repeated_content_goes_as_references_and_decodes_to_equal_ram() -> None:
    p = Pair()
    for i in range(8):
        fill(p.src, i, i)
    for i in range(8, 40):
        fill(p.src, i, i % 8)  # each of the first 8 contents again, four times
    # Within one batch nothing is referenced (a reference only points at an earlier batch):
    # the first batch goes raw, repeated contents included.
    assert p.send(list(range(0, 16))) == {"raw": 16}
    payload, by_codec = p.encode(list(range(16, 40)) + [50])
    assert by_codec == {"dedup": 24, "zero": 1}
    assert len(payload) < 24 * (REF_SIZE + 13) + 64
    for page, target in refs_of(payload, 25):
        assert target == page % 8  # the first page that had the content
        assert np.array_equal(p.src[target], p.src[page])
    p.receive(payload)
    assert np.array_equal(p.dst, p.src)
    st = p.scodecs.stats()["dedup"]
    assert st["references"] == 24 and st["bytes_saved"] == 24 * (PAGE_SIZE - REF_SIZE)


def test_frozen_ram_and_scattered_pages() -> None:
    """Pages taken straight from paused RAM (a run) and through a copy (scattered)."""
    p = Pair()
    for i in range(0, NPAGES, 2):
        fill(p.src, i, i % 3)
    b = p.enc.encode(np.arange(0, 6), frozen=True)
    p.receive(b.meta + b"".join(bytes(d) for d in b.data))
    assert p.send(list(range(6, NPAGES, 2))) == {"dedup": 29}
    p.send(list(range(7, NPAGES, 2)))
    assert np.array_equal(p.dst, p.src)


def _two_batches(p: Pair) -> bytes:
    """Batch one sends pages 0..3 (contents 0..3) and is placed; returns batch two, pages
    10..13 with the same contents: all references."""
    for i in range(4):
        fill(p.src, i, i)
        fill(p.src, 10 + i, i)
    p.send([0, 1, 2, 3])
    payload, by_codec = p.encode([10, 11, 12, 13])
    assert by_codec == {"dedup": 4}
    return payload


def test_reference_refused_when_the_referenced_page_differs() -> None:
    p = Pair()
    payload = _two_batches(p)
    p.dst[2, 100] ^= 0xFF  # the destination's page 2 is not what the source sent
    before = p.dst.copy()
    with pytest.raises(ProtocolError, match="page 12 to page 2 does not match"):
        p.receive(payload)
    assert np.array_equal(p.dst, before)  # nothing written, not even the good references


def test_reference_refused_when_the_digest_is_not_the_pages() -> None:
    p = Pair()
    payload = bytearray(_two_batches(p))
    payload[-1] ^= 1  # the last reference's digest (page 13 -> page 3)
    before = p.dst.copy()
    with pytest.raises(ProtocolError, match="page 13 to page 3 does not match"):
        p.receive(bytes(payload))
    assert np.array_equal(p.dst, before)


def test_reference_refused_when_it_names_another_page() -> None:
    p = Pair()
    payload = bytearray(_two_batches(p))
    n = 4
    start = len(payload) - n * REF_SIZE
    payload[start : start + 8] = (1).to_bytes(8, "little")  # page 10 now points at page 1
    before = p.dst.copy()
    with pytest.raises(ProtocolError, match="page 10 to page 1 does not match"):
        p.receive(bytes(payload))
    payload[start : start + 8] = (NPAGES + 7).to_bytes(8, "little")
    with pytest.raises(ProtocolError, match="outside RAM"):
        p.receive(bytes(payload))
    payload[start : start + 8] = (2**64 - 1).to_bytes(8, "little")
    with pytest.raises(ProtocolError, match="dedup reference to page"):
        p.receive(bytes(payload))
    assert np.array_equal(p.dst, before)


def test_a_forged_digest_without_the_key_does_not_pass() -> None:
    """An unkeyed digest of the right content is not the keyed one: refused."""
    p = Pair()
    payload = bytearray(_two_batches(p))
    start = len(payload) - 4 * REF_SIZE
    payload[start + 8 : start + REF_SIZE] = blake3.blake3(p.src[0].tobytes()).digest()
    with pytest.raises(ProtocolError, match="page 10 to page 0"):
        p.receive(bytes(payload))


# -- staleness -------------------------------------------------------------------------------


def test_changed_page_is_not_referenced_with_its_old_content() -> None:
    p = Pair()
    fill(p.src, 0, 7)  # A = page 0 holds X
    p.send([0])
    fill(p.src, 0, 8)  # A changes and is sent again
    assert p.send([0]) == {"raw": 1}
    fill(p.src, 5, 7)  # a page with A's old content: not a reference to A
    payload, by_codec = p.encode([5])
    assert by_codec == {"raw": 1}
    p.receive(payload)
    assert np.array_equal(p.dst, p.src)
    fill(p.src, 6, 7)  # ... but to page 5, which holds it now
    payload, by_codec = p.encode([6])
    assert by_codec == {"dedup": 1} and refs_of(payload, 1) == [(6, 5)]
    p.receive(payload)
    assert np.array_equal(p.dst, p.src)


def test_page_zeroed_in_an_all_zero_batch_is_no_longer_a_target() -> None:
    """The zero codec takes such a batch whole; the dedup codec must still see the page
    change (the encoder asks every codec about every batch)."""
    p = Pair()
    fill(p.src, 0, 7)
    p.send([0])
    p.src[0] = 0
    assert p.send([0, 1]) == {"zero": 2}
    fill(p.src, 5, 7)
    assert p.send([5]) == {"raw": 1}
    assert np.array_equal(p.dst, p.src)


def test_no_reference_into_the_same_batch() -> None:
    """A changes in the batch that also carries A's old content elsewhere: that page must not
    point at A (which this very batch overwrites)."""
    p = Pair()
    fill(p.src, 0, 7)
    p.send([0])
    fill(p.src, 0, 8)
    fill(p.src, 5, 7)
    assert p.send([0, 5]) == {"raw": 2}
    assert np.array_equal(p.dst, p.src)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.lists(hs.lists(hs.tuples(hs.integers(0, 15), hs.integers(0, 4)), min_size=1,
                         max_size=10), min_size=1, max_size=12))
def test_any_sequence_of_writes_and_batches_stays_equal(steps: list[list[tuple[int,
                                                                              int]]]) -> None:
    """Random writes (content 0 = a zero page) each sent as one batch: the destination never
    refuses a reference and always ends equal to the source."""
    p = Pair(16)
    for step in steps:
        for page, content in step:
            if content:
                fill(p.src, page, content)
            else:
                p.src[page] = 0
        p.send(sorted({page for page, _ in step}))
        assert np.array_equal(p.dst, p.src)


# The other codecs that keep per-page state or come first, when this tree has them.
OTHERS = [n for n in ("xbzrle", "zstd") if n in BY_NAME]


@pytest.mark.skipif(not OTHERS, reason="no xbzrle or compression codec in this tree")
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.lists(hs.lists(hs.tuples(hs.integers(0, 15), hs.integers(-2, 3)), min_size=1,
                         max_size=10), min_size=1, max_size=12))
def test_with_the_other_codecs_every_batch_stays_equal(steps: list[list[tuple[int,
                                                                                int]]]) -> None:
    """As above with xbzrle (deltas of pages sent before) and compression in the session:
    content < 0 changes a few bytes of the page (an xbzrle delta), 0 zeroes it."""
    opts = MigrationOptions(dedup=True, xbzrle=True,
                            compress="zstd" if "zstd" in OTHERS else None)
    p = Pair(16, NAMES + OTHERS, opts)
    for step in steps:
        for page, content in step:
            if content > 0:
                fill(p.src, page, content)
            elif content == 0:
                p.src[page] = 0
            else:
                p.src[page, 8 * page : 8 * page - content] += 1
        p.send(sorted({page for page, _ in step}))
        assert np.array_equal(p.dst, p.src)


# -- the decoder, fuzzed -------------------------------------------------------------------------


def _fuzz_pair() -> Pair:
    p = Pair(16)
    for i in range(4):
        fill(p.src, i, i + 1)
    p.send([0, 1, 2, 3])
    return p


FUZZ_PAIR = _fuzz_pair()


def _payload(idx: list[int], ids: list[int], lens: list[int], data: bytes) -> bytes:
    n = len(idx)
    meta = bytearray((8 + 13 * n + 7) & ~7)
    meta[0:4] = n.to_bytes(4, "little")
    meta[8 : 8 + 8 * n] = np.array(idx, dtype="<u8").tobytes()
    meta[8 + 8 * n : 8 + 12 * n] = np.array(lens, dtype="<u4").tobytes()
    meta[8 + 12 * n : 8 + 13 * n] = bytes(ids)
    return bytes(meta) + data


def _decode_and_place(payload: bytes) -> None:
    p = FUZZ_PAIR
    ram = p.dst.copy()
    try:
        batch = decode(memoryview(payload), len(ram), p.dcodecs)
        apply(batch, p.dcodecs, RamPlacer(ram))
    except ProtocolError:
        return


@settings(max_examples=400, deadline=None)
@given(hs.data())
def test_decoder_fuzzed_only_protocol_errors(data: hs.DataObject) -> None:
    n = data.draw(hs.integers(1, 6))
    idx = data.draw(hs.lists(hs.integers(0, 20), min_size=n, max_size=n))
    ids = data.draw(hs.lists(hs.sampled_from([0, 1, 5, 5, 5, 2]), min_size=n, max_size=n))
    lens = [data.draw(hs.sampled_from([0, REF_SIZE, PAGE_SIZE, REF_SIZE - 1, 3]))
            if data.draw(hs.booleans()) else {0: 0, 1: PAGE_SIZE, 5: REF_SIZE}.get(c, 7)
            for c in ids]
    refs = b"".join(
        data.draw(hs.integers(0, 24)).to_bytes(8, "little")
        + (data.draw(hs.binary(min_size=32, max_size=32)) if data.draw(hs.booleans())
           else blake3.blake3(FUZZ_PAIR.dst[data.draw(hs.integers(0, 15))].tobytes(),
                              key=FUZZ_PAIR.key).digest())
        for _ in range(n))
    body = data.draw(hs.sampled_from(["refs", "random", "mixed"]))
    if body == "refs":
        blob = refs
    elif body == "random":
        blob = data.draw(hs.binary(max_size=3 * REF_SIZE))
    else:
        blob = refs + bytes(PAGE_SIZE * ids.count(1))
    size = sum(lens) if data.draw(hs.booleans()) else len(blob)
    blob = (blob + bytes(max(0, size - len(blob))))[:size]
    _decode_and_place(_payload(idx, ids, lens, blob))


@settings(max_examples=300, deadline=None)
@given(hs.binary(max_size=700), hs.integers(0, 690), hs.binary(min_size=1, max_size=4))
def test_decoder_fuzzed_on_a_real_batch(noise: bytes, at: int, flip: bytes) -> None:
    p = Pair(16)
    for i in range(4):
        fill(p.src, i, i + 1)
        fill(p.src, 8 + i, i + 1)
    p.send([0, 1, 2, 3])
    payload, by_codec = p.encode([8, 9, 10, 11, 12])
    assert by_codec == {"dedup": 4, "zero": 1}
    damaged = bytearray(payload)
    for k, b in enumerate(flip):
        if at + k < len(damaged):
            damaged[at + k] ^= b or 1
    ram = p.dst.copy()
    for case in (bytes(damaged), payload[:at], payload + noise):
        try:
            apply(decode(memoryview(case), len(ram), p.dcodecs), p.dcodecs, RamPlacer(ram))
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(hs.one_of(hs.none(), hs.dictionaries(hs.text(max_size=4), hs.one_of(
    hs.binary(max_size=40), hs.integers(), hs.text(max_size=40), hs.none()), max_size=3)))
def test_key_parameters_fuzzed(params: dict[str, object] | None) -> None:
    try:
        st = DedupCodec().new_state(None, params)
    except ProtocolError:
        return
    assert isinstance(st, DestState)
    assert st.key is None or len(st.key) == 32


# -- whole migrations -----------------------------------------------------------------------------


def duplicate_heavy(mem: int = 32 << 20, distinct: int = 64) -> MemoryMachine:
    """Three quarters of RAM filled from `distinct` page contents, the rest zero."""
    m = MemoryMachine(memory_config(mem, vcpus=2))
    rng = np.random.default_rng(9)
    patterns = rng.integers(0, 256, size=(distinct, PAGE_SIZE), dtype=np.uint8)
    n = len(m.memory.pages) * 3 // 4
    m.memory.pages[:n] = patterns[rng.integers(0, distinct, n)]
    m.start()
    return m


@pytest.mark.parametrize("mode", [Mode.PRECOPY, Mode.STOP_COPY])
def test_engine_migration_with_dedup_sends_less(mode: Mode) -> None:
    sent = {}
    for dedup in (False, True):
        src = duplicate_heavy()
        before = src.memory.pages.copy()
        d = Dest()
        stats = migrate(src, connect(d.addr),
                        MigrationOptions(mode=mode, dedup=dedup, verify_memory=True))
        d.join()
        assert d.error is None and d.machine is not None
        assert stats.status == "completed" and stats.verified_memory
        assert np.array_equal(d.machine.memory.pages, before)
        sent[dedup] = stats.bytes_sent
        if dedup:
            out = stats.to_json()["codecs"]["dedup"]
            n = len(before) * 3 // 4
            # all but the first batch: a reference only points at an earlier batch
            assert out["pages"] == out["references"] >= n - 512
            assert out["bytes_saved"] == out["references"] * (PAGE_SIZE - REF_SIZE)
    assert sent[True] < sent[False] / 5


def test_engine_live_migration_with_writer_and_dedup() -> None:
    """A writer fills pages with one byte value after another (many equal pages, changing all
    the time): pre-copy rounds re-send them; no stale reference, memory verified."""
    src = duplicate_heavy(16 << 20)
    g = Guest(src, np.arange(0, len(src.memory.pages), 2))
    d = Dest()
    stats = migrate(src, connect(d.addr), MigrationOptions(dedup=True, verify_memory=True))
    g.stop.set()
    d.join()
    assert d.error is None and d.machine is not None, d.error
    assert stats.status == "completed" and stats.verified_memory
    assert np.array_equal(d.machine.memory.pages, src.memory.pages)
    assert stats.to_json()["codecs"]["dedup"]["references"] > 0


@needs_kvm
def test_live_migration_of_a_verify_guest_with_dedup(machines, tmp_path: Path) -> None:
    migrate_verify_guest(machines, tmp_path, "--dedup")
