"""The compression codecs `zstd` and `lz4` (codecs/compress.py): one frame per batch, its size
on the batch's last page; incompressible batches go raw; bounded, checked decompression;
`auto` compresses only while the link is the bottleneck."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from typing import Any

import lz4.block
import numpy as np
import pytest
import zstandard
from conftest import migrate_verify_guest, needs_kvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memmachine import MemoryMachine, memory_config
from test_migrate_engine import Dest, Guest, connect

from livemig.contract import PAGE_SIZE
from livemig.migration import MigrationOptions, migrate
from livemig.migration.codecs import BY_NAME, REGISTRY, CodecSet, offered
from livemig.migration.codecs.compress import CompressCodec, CompressState
from livemig.migration.errors import ProtocolError
from livemig.migration.pages import BatchEncoder, RamPlacer, apply, decode

CODECS = ["zstd", "lz4"]
TOKENS = np.random.default_rng(7).integers(0, 256, (64, 8), dtype=np.uint8)


def compressible(n: int, seed: int = 1) -> np.ndarray:
    """n pages of 8-byte tokens from a vocabulary of 64: zstd ~0.2, lz4 ~0.4 of the size."""
    rng = np.random.default_rng(seed)
    return TOKENS[rng.integers(0, len(TOKENS), (n, PAGE_SIZE // 8))].reshape(n, PAGE_SIZE)


def random_pages(n: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)


class Pipe:
    """A source encoder and a destination decoder for one session, without a socket."""

    def __init__(self, ram: np.ndarray, names: list[str], opts: MigrationOptions) -> None:
        self.ram = ram
        self.src = CodecSet(names, opts)
        self.enc = BatchEncoder(ram, self.src)
        self.dst_codecs = CodecSet(names)
        self.dst_codecs.configure(self.src.params())
        self.dst = np.zeros_like(ram)

    def send(self, idx: np.ndarray) -> tuple[dict[str, int], dict[str, int], Any]:
        b = self.enc.encode(idx)
        try:
            payload = memoryview(b.meta + b"".join(bytes(d) for d in b.data))
        finally:
            self.enc.release(b)
        batch = decode(payload, len(self.ram), self.dst_codecs)
        apply(batch, self.dst_codecs, RamPlacer(self.dst))
        return b.by_codec, b.bytes_by_codec, batch


def pipe(ram: np.ndarray, compress: str) -> Pipe:
    """zero, raw and the compression codecs `compress` asks for."""
    own = CODECS if compress == "auto" else [compress]
    return Pipe(ram, ["zero", *own, "raw"], MigrationOptions(compress=compress))


# -- registry and options ---------------------------------------------------------------------


def test_registered_before_raw_and_offered_as_asked() -> None:
    names = [c.name for c in REGISTRY]
    assert names.index("zstd") < names.index("lz4") == names.index("raw") - 1
    assert BY_NAME["zstd"].id == 3 and BY_NAME["lz4"].id == 4
    assert "zstd" not in offered(MigrationOptions()) and "lz4" not in offered(MigrationOptions())
    assert {"zstd", "lz4"} & set(offered(MigrationOptions(compress="zstd"))) == {"zstd"}
    assert {"zstd", "lz4"} & set(offered(MigrationOptions(compress="lz4"))) == {"lz4"}
    assert {"zstd", "lz4"} <= set(offered(MigrationOptions(compress="auto")))


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CODECS)
def test_compressible_batch_is_one_frame_on_the_last_page(name: str) -> None:
    ram = np.zeros((2048, PAGE_SIZE), np.uint8)
    ram[:512] = compressible(512)
    ram[600:1100:2] = compressible(250, seed=3)  # a batch with holes: zero pages between
    p = pipe(ram, name)
    pages, nbytes, batch = p.send(np.arange(512))
    assert pages == {name: 512} and nbytes[name] < 0.5 * 512 * PAGE_SIZE
    lens = batch.lens[batch.ids == BY_NAME[name].id]
    assert not lens[:-1].any() and lens[-1] == nbytes[name] == len(batch.data)
    pages, _, batch = p.send(np.arange(600, 1100))
    assert pages == {"zero": 250, name: 250}
    own = batch.ids == BY_NAME[name].id
    assert np.flatnonzero(own)[-1] == 498 and batch.lens[own][-1] > 0  # the last page it took
    pages, _, _ = p.send(np.array([3, 900, 5, 2047, 601]))  # not a run, not in order
    assert set(pages) == {name, "zero"}
    assert np.array_equal(p.dst, ram)
    st_ = p.src.stats()[name]
    assert st_["batches"] == 3 and st_["skipped"] == 0 and st_["ratio_pct"] < 50
    assert p.dst_codecs.stats()[name]["batches"] == 3


@pytest.mark.parametrize("name", CODECS)
def test_random_batch_is_not_claimed_and_goes_raw(name: str) -> None:
    ram = np.concatenate([random_pages(512), compressible(64)])
    ram[5] = 0
    p = pipe(ram, name)
    pages, _, _ = p.send(np.arange(512))
    assert pages == {"zero": 1, "raw": 511}
    pages, _, _ = p.send(np.arange(512, 576))
    assert pages == {name: 64}
    assert np.array_equal(p.dst, ram)
    st_ = p.src.stats()[name]
    assert st_["skipped"] == 1 and st_["batches"] == 1


def test_barely_compressible_batch_goes_raw() -> None:
    """A frame must come out below 90 % of the pages: 92 % random bytes per page is not."""
    ram = compressible(512)
    ram[:, : PAGE_SIZE * 92 // 100] = random_pages(512)[:, : PAGE_SIZE * 92 // 100]
    for name in CODECS:
        pages, _, _ = pipe(ram, name).send(np.arange(512))
        assert pages == {"raw": 512}, name


# -- the destination's checks -----------------------------------------------------------------


@pytest.mark.parametrize("name", CODECS)
def test_check_accepts_only_one_frame_on_the_last_page(name: str) -> None:
    c = BY_NAME[name]
    ok = np.array([0, 0, 0, 100], np.uint32)
    assert c.check(ok) is None and c.check(np.zeros(0, np.uint32)) is None
    assert c.check(np.array([1], np.uint32)) is None
    assert c.check(np.array([PAGE_SIZE], np.uint32)) is None
    for bad in ([0, 100, 0, 100], [100, 0, 0, 0], [0, 0, 0, 0], [0], [PAGE_SIZE + 1],
                [0, 2 * PAGE_SIZE + 1]):
        assert c.check(np.array(bad, np.uint32)) is not None, bad


def payload_with(frame: bytes, n: int, cid: int) -> memoryview:
    """A PAGES payload: pages 0..n-1 of codec `cid`, `frame` on the last one."""
    from livemig.migration.pages import _HEAD, meta_size

    meta = bytearray(meta_size(n))
    _HEAD.pack_into(meta, 0, n, 0)
    o = _HEAD.size
    meta[o : o + 8 * n] = np.arange(n, dtype="<u8").tobytes()
    lens = np.zeros(n, "<u4")
    lens[-1] = len(frame)
    meta[o + 8 * n : o + 12 * n] = lens.tobytes()
    meta[o + 12 * n : o + 13 * n] = bytes([cid]) * n
    return memoryview(bytes(meta) + frame)


def place(name: str, frame: bytes, n: int) -> np.ndarray:
    """Decode and place a frame for pages 0..n-1 into a fresh 64-page RAM."""
    ram = np.zeros((64, PAGE_SIZE), np.uint8)
    codecs = CodecSet(["zero", name, "raw"])
    codecs.configure({})
    apply(decode(payload_with(frame, n, BY_NAME[name].id), 64, codecs), codecs, RamPlacer(ram))
    return ram


def zstd_frame(data: bytes, **kw: Any) -> bytes:
    return zstandard.ZstdCompressor(level=1, **kw).compress(data)


def lz4_frame(data: bytes) -> bytes:
    return bytes(lz4.block.compress(data, store_size=False))


FRAME = {"zstd": zstd_frame, "lz4": lz4_frame}


@pytest.mark.parametrize("name", CODECS)
def test_bomb_is_refused(name: str) -> None:
    """Zeros compress ~250:1 (lz4) to ~30000:1 (zstd): a frame that fits the length check
    for 2 pages but holds far more must fail in the decoder, without the big allocation."""
    bomb = FRAME[name](bytes((64 if name == "zstd" else 1) << 20))
    assert len(bomb) <= 2 * PAGE_SIZE  # check() lets it through: the decoder must refuse
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            place(name, bomb, 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    with pytest.raises(ProtocolError):  # and through the codec alone, without check()
        BY_NAME[name].place(np.arange(2), np.array([0, len(bomb)], np.uint32),
                            memoryview(bomb), RamPlacer(np.zeros((2, PAGE_SIZE), np.uint8)),
                            None)
    if name == "zstd":  # no content size in the header: refused before decoding
        with pytest.raises(ProtocolError, match="declares no size"):
            place(name, zstd_frame(bytes(64 << 20), write_content_size=False), 2)


@pytest.mark.parametrize("name", CODECS)
def test_every_header_byte_value(name: str) -> None:
    """Each of a frame's first 12 bytes set to each value: decoded exactly, or refused."""
    good = FRAME[name](compressible(3).tobytes())
    for pos in range(12):
        for value in range(256):
            frame = bytearray(good)
            frame[pos] = value
            try:
                ram = place(name, bytes(frame), 3)
            except ProtocolError:
                continue
            assert ram[3:].sum() == 0


@pytest.mark.parametrize("name", CODECS)
def test_wrong_size_trailing_bytes_and_truncation_are_refused(name: str) -> None:
    data = compressible(3).tobytes()
    good = FRAME[name](data)
    assert np.array_equal(place(name, good, 3)[:3], compressible(3))
    for frame, n in ((good, 2), (good, 4),  # the frame holds 3 pages
                     (FRAME[name](data[:-1]), 3), (FRAME[name](data + b"x"), 3),
                     (good + b"\0", 3), (good + good, 3), (good[:-1], 3), (good[:5], 3)):
        with pytest.raises(ProtocolError):
            place(name, frame, n)


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=1, max_size=3000), n=st.integers(1, 4))
def test_fuzz_decoder_raises_only_protocol_error(name: str, data: bytes, n: int) -> None:
    try:
        ram = place(name, data, n)
    except ProtocolError:
        return
    assert ram[n:].sum() == 0  # it decoded: exactly its n pages, nothing else


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), seed=st.integers(0, 3), where=st.integers(0, 1 << 30),
       byte=st.integers(0, 255), cut=st.integers(0, 64), extra=st.binary(max_size=8))
def test_fuzz_mutated_frames_raise_only_protocol_error(name: str, n: int, seed: int, where: int,
                                                      byte: int, cut: int,
                                                      extra: bytes) -> None:
    frame = bytearray(FRAME[name](compressible(n, seed).tobytes()))
    frame[where % len(frame)] = byte
    frame = frame[: max(1, len(frame) - cut)] + extra
    try:
        ram = place(name, bytes(frame), n)
    except ProtocolError:
        return
    assert ram[n:].sum() == 0


# -- auto -------------------------------------------------------------------------------------


def auto_run(ram: np.ndarray, batches: int, sleep: float = 0.0,
             observe: float | None = None) -> Pipe:
    """Send `batches` batches of 512 pages with `auto`; between batches sleep `sleep` (a slow
    link, as seen from the claims) or report `observe` bytes/s sends to the codecs."""
    p = pipe(ram, "auto")
    for k in range(batches):
        first = (k * 512) % len(ram)
        pages, nbytes, _ = p.send(np.arange(first, first + 512))
        if observe is not None:
            for cid in (3, 4):
                st_: CompressState = p.src.state[cid]
                wire = sum(nbytes.values())
                st_.observe(wire, wire / observe)
        time.sleep(sleep)
    assert np.array_equal(p.dst[: min(len(ram), batches * 512)],
                          ram[: min(len(ram), batches * 512)])
    return p


def decisions(p: Pipe) -> tuple[int, int]:
    """Batches compressed (by either codec), batches declined by both."""
    z, lz = p.src.state[3], p.src.state[4]
    return z.batches + lz.batches, lz.declined


def test_auto_compresses_on_a_slow_link_measured_between_claims() -> None:
    p = auto_run(compressible(4096), 24, sleep=0.05)  # 2 MiB per 50 ms: ~40 MB/s
    compressed, declined = decisions(p)
    z: CompressState = p.src.state[3]
    assert z.link_rate() is not None and z.link_rate() < 100e6
    assert compressed >= 20 and declined <= 3, (compressed, declined, p.src.stats())
    assert z.batches >= 20  # zstd first: the better ratio


def test_auto_declines_on_a_fast_link_measured_between_claims() -> None:
    p = auto_run(compressible(4096), 40)  # nothing between batches but the encoding itself
    compressed, declined = decisions(p)
    z: CompressState = p.src.state[3]
    c, r, link = z.compress_rate(), z.ratio(), z.link_rate()
    assert c and r and link and c * (1 - r) < link, (c, r, link)
    assert declined >= 30 and compressed <= 8, (compressed, declined, p.src.stats())
    st_ = p.src.stats()["zstd"]
    assert st_["declined"] >= 30 and st_["link_rate"] > 0 and st_["compress_rate"] > 0


@pytest.mark.parametrize("rate,compresses", [(20e6, True), (50e9, False)])
def test_auto_with_the_rate_the_source_observes(rate: float, compresses: bool) -> None:
    p = auto_run(compressible(4096), 24, observe=rate)
    compressed, declined = decisions(p)
    if compresses:
        assert compressed >= 22 and declined <= 1, (compressed, declined)
    else:
        assert declined >= 20 and compressed <= 4, (compressed, declined)


def test_auto_does_not_compress_random_data_on_a_slow_link() -> None:
    p = auto_run(random_pages(2048), 16, observe=20e6)
    assert decisions(p)[0] == 0
    assert p.src.stats()["zstd"]["skipped"] >= 1


def test_auto_rule_is_compress_rate_times_saving_against_link_rate() -> None:
    s = CompressState(auto=True)
    assert s.worth_it(time.monotonic())  # nothing known: compress, to measure C and r
    s.attempted(4 << 20, 1 << 20, 0.01, True)  # C = 419 MB/s, r = 0.25: saves 315 MB/s
    assert not s.worth_it(time.monotonic())  # L unknown: raw, to measure it
    s.observe(100 << 20, 1.0)
    assert s.worth_it(time.monotonic())
    t = CompressState(auto=True)
    t.attempted(4 << 20, 1 << 20, 0.01, True)
    t.observe(400 << 20, 1.0)
    assert not t.worth_it(time.monotonic())  # 315 MB/s saved < 419 MB/s link
    assert t.worth_it(time.monotonic() + 1)  # but C and r are re-measured now and then
    assert t.counters()["probes"] == 1 and t.counters()["declined"] == 1


# -- the engine -------------------------------------------------------------------------------


def machine(mem: int = 32 << 20) -> MemoryMachine:
    """RAM: a quarter random, half compressible, the rest zero."""
    m = MemoryMachine(memory_config(mem, vcpus=2))
    n = len(m.memory.pages)
    m.memory.pages[: n // 4] = random_pages(n // 4)
    m.memory.pages[n // 4 : 3 * n // 4] = compressible(n // 2)
    m.start()
    return m


@pytest.mark.parametrize("compress,bw", [("zstd", None), ("lz4", None), ("auto", None),
                                         ("auto", 40e6)])
def test_live_migration_with_compression(compress: str, bw: float | None) -> None:
    src = machine(16 << 20 if bw else 32 << 20)
    g = Guest(src, np.arange(len(src.memory.pages) // 4, len(src.memory.pages), 3))  # not raw
    time.sleep(0.05)
    d = Dest()
    stats = migrate(src, connect(d.addr), MigrationOptions(compress=compress, verify_memory=True,
                                                           max_bandwidth=bw))
    g.stop.set()
    d.join()
    assert d.error is None and d.machine is not None
    assert stats.status == "completed" and stats.verified_memory
    assert np.array_equal(d.machine.memory.pages, src.memory.pages)
    assert d.machine.counter == src.counter
    pages = stats.pages()
    assert pages["raw"] >= len(src.memory.pages) // 4  # the random quarter
    if compress != "auto":
        assert pages[compress] > 0
        assert stats.to_json()["codecs"][compress]["batches"] > 0
    elif bw:  # a 40 MB/s link: compressing pays
        assert pages.get("zstd", 0) + pages.get("lz4", 0) >= len(src.memory.pages) // 4


@pytest.mark.parametrize("compress,bw", [("zstd", None), ("auto", 40e6)])
def test_live_migration_with_compression_on_page_streams(compress: str,
                                                         bw: float | None) -> None:
    """--streams 2: batches are encoded on one thread and sent on two connections."""
    from test_engine_security import KEY, Dst, send

    from livemig.migration.security import Security

    src = machine(16 << 20)
    g = Guest(src, np.arange(len(src.memory.pages) // 4, len(src.memory.pages), 3))
    time.sleep(0.05)
    dst = Dst(Security(key=KEY))
    stats = send(src, dst, Security(key=KEY), streams=2, compress=compress, max_bandwidth=bw)
    g.stop.set()
    res = dst.result()
    assert res.error is None and res.machine is not None, res.error
    assert np.array_equal(res.machine.memory.pages, src.memory.pages)
    assert stats.verified_memory and stats.channels["pages-1"]["bytes_sent"] > 0
    pages = stats.pages()
    assert pages.get("zstd", 0) + pages.get("lz4", 0) >= len(src.memory.pages) // 4, pages
    dst.close()


def test_compressible_memory_sends_fewer_bytes_with_zstd() -> None:
    sent = {}
    for compress in (None, "zstd", "lz4"):
        src = machine()
        d = Dest()
        stats = migrate(src, connect(d.addr), MigrationOptions(compress=compress))
        d.join()
        assert d.error is None and d.machine is not None
        assert np.array_equal(d.machine.memory.pages, src.memory.pages)
        sent[compress] = stats.bytes_sent
    # a quarter random (raw either way), half compressible (zstd ~0.2, lz4 ~0.4), a quarter zero
    assert sent["zstd"] < 0.65 * sent[None], sent
    assert sent["zstd"] < sent["lz4"] < 0.85 * sent[None], sent


# -- a real guest -----------------------------------------------------------------------------


@needs_kvm
def test_verify_guest_migrates_with_zstd(machines: Any, tmp_path: Path) -> None:
    stats = migrate_verify_guest(machines, tmp_path, "--compress", "zstd")
    assert stats["codecs"]["zstd"]["pages"] > 0, stats["codecs"]
    assert stats["codecs"]["zstd"]["bytes"] < stats["codecs"]["zstd"]["pages"] * PAGE_SIZE


def test_compress_codec_classes_share_one_base() -> None:
    assert isinstance(BY_NAME["zstd"], CompressCodec) and isinstance(BY_NAME["lz4"], CompressCodec)
