"""Page batches: the PAGES record, encoded and decoded with the session's codecs.

PAGES payload, little-endian, n = number of pages (1..MAX_BATCH):

    u32      n
    u32      reserved, 0
    u64[n]   page index (guest-physical offset / page size)
    u32[n]   encoded length of each page's data
    u8[n]    codec id of each page (codecs/: 0 zero, 1 raw, ...)
    pad      zero bytes up to a multiple of 8
    data     the encoded pages, grouped by codec in ascending id order, each group in table
             order, back to back

The length table lets a receiver walk a batch whose codecs have variable lengths
(compression, deltas, references), so new codecs need no new record type. Only codecs
negotiated in the hello may appear.
"""

from __future__ import annotations

import queue
import struct
from dataclasses import dataclass, field

import numpy as np

from livemig.contract import PAGE_SIZE
from livemig.migration.codecs import CodecSet, PagePlacer
from livemig.migration.errors import ProtocolError
from livemig.migration.wire import HEADER_SIZE

MAX_BATCH = 512  # pages per PAGES record (2 MiB of raw data; measured best of 256..1024)
_HEAD = struct.Struct("<II")


def meta_size(n: int) -> int:
    """Bytes before the data of an n-page batch (header, tables, padding)."""
    raw = _HEAD.size + n * (8 + 4 + 1)
    return (raw + 7) & ~7


@dataclass
class EncodedBatch:
    """A PAGES payload ready to send: `meta` then `data` buffers; pages and bytes per codec."""

    meta: bytes
    data: list[bytes | memoryview]
    pages: int
    by_codec: dict[str, int] = field(default_factory=dict)
    bytes_by_codec: dict[str, int] = field(default_factory=dict)
    buffer: np.ndarray | None = None  # the encoder's buffer behind `data`, until released

    @property
    def wire_size(self) -> int:
        """Bytes of the PAGES record on the wire, header included."""
        return HEADER_SIZE + len(self.meta) + sum(memoryview(d).nbytes for d in self.data)


class BatchEncoder:
    """Copies pages out of live RAM into a private buffer and encodes them.

    The copy is taken first so that the CRC and the bytes sent are of the same snapshot even
    while the guest keeps writing (the page is dirty again then, and will be re-sent). With
    `buffers` > 1 several encoded batches may be in flight (page streams); each holds its
    buffer until `release`.
    """

    def __init__(self, ram_pages: np.ndarray, codecs: CodecSet, buffers: int = 1) -> None:
        self.ram = ram_pages
        self.codecs = codecs
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for _ in range(buffers):
            self._free.put(np.empty((MAX_BATCH, PAGE_SIZE), dtype=np.uint8))

    def release(self, batch: EncodedBatch) -> None:
        """The batch is on the wire: its buffer may be reused."""
        if batch.buffer is not None:
            self._free.put(batch.buffer)
            batch.buffer = None

    def _pages(self, idx: np.ndarray, frozen: bool) -> tuple[np.ndarray, np.ndarray | None]:
        n = len(idx)
        first = int(idx[0])
        run = int(idx[-1]) - first == n - 1 and is_run(idx)
        if run and frozen:  # paused guest: nothing can change between CRC and send
            return self.ram[first : first + n], None
        buf = self._free.get()
        copy = buf[:n]
        if run:
            copy[:] = self.ram[first : first + n]  # one memcpy for a run of pages
        else:
            np.take(self.ram, idx, axis=0, out=copy)
        return copy, buf

    def _claim(self, idx: np.ndarray, pages: np.ndarray, todo: np.ndarray, out: EncodedBatch,
               ids: np.ndarray, lens: np.ndarray,
               groups: dict[int, list[bytes | memoryview]]) -> None:
        """Let each codec in turn take its pages of the batch. Every codec sees every batch,
        even when earlier ones took all of it: some learn from what is sent (a delta cache)."""
        for codec in self.codecs.codecs:
            c = codec.claim(idx, pages, todo, self.codecs.state[codec.id])
            if not c.mask.any():
                continue
            todo &= ~c.mask
            ids[c.mask] = codec.id
            lens[c.mask] = c.lens
            groups[codec.id] = c.data
            out.by_codec[codec.name] = int(np.count_nonzero(c.mask))
            out.bytes_by_codec[codec.name] = int(c.lens.sum(dtype=np.uint64))
        if todo.any():
            raise ValueError("no negotiated codec took some pages (raw must be last)")

    def encode(self, idx: np.ndarray, frozen: bool = False) -> EncodedBatch:
        """Encode pages `idx` (at most MAX_BATCH); `frozen` says the guest is paused."""
        n = len(idx)
        if not 0 < n <= MAX_BATCH:
            raise ValueError(f"batch of {n} pages")
        pages, buf = self._pages(idx, frozen)
        todo = np.ones(n, dtype=bool)
        ids = np.zeros(n, dtype=np.uint8)
        lens = np.zeros(n, dtype=np.uint32)
        groups: dict[int, list[bytes | memoryview]] = {}
        out = EncodedBatch(b"", [], n, buffer=buf)
        try:
            self._claim(idx, pages, todo, out, ids, lens, groups)
        except BaseException:
            self.release(out)
            raise
        meta = bytearray(meta_size(n))
        _HEAD.pack_into(meta, 0, n, 0)
        o = _HEAD.size
        meta[o : o + 8 * n] = idx.astype("<u8").tobytes()
        meta[o + 8 * n : o + 12 * n] = lens.astype("<u4").tobytes()
        meta[o + 12 * n : o + 13 * n] = ids.tobytes()
        out.meta = bytes(meta)
        out.data = [b for cid in sorted(groups) for b in groups[cid]]
        return out


@dataclass
class DecodedBatch:
    """A checked PAGES payload: arrays over the receive buffer. `data` holds the encoded
    bytes of every codec but those in `placed` (already in RAM: `direct.py`)."""

    idx: np.ndarray
    lens: np.ndarray
    ids: np.ndarray
    data: memoryview
    placed: frozenset[int] = frozenset()

    def count(self, codec_id: int) -> int:
        return int(np.count_nonzero(self.ids == codec_id))

    def counts(self) -> np.ndarray:
        """Pages per codec id (index: the id)."""
        return np.bincount(self.ids, minlength=256)


def batch_size(head: memoryview | bytes) -> int:
    """Pages in a PAGES payload, from its first 8 bytes; ProtocolError if out of range."""
    if len(head) < _HEAD.size:
        raise ProtocolError(f"PAGES record too short ({len(head)} bytes)")
    n, reserved = _HEAD.unpack_from(head)
    if reserved != 0 or not 0 < n <= MAX_BATCH:
        raise ProtocolError(f"PAGES record with bad header (count {n}, reserved {reserved};"
                            f" at most {MAX_BATCH} pages)")
    return int(n)


def decode_tables(meta: memoryview, data_len: int, npages: int,
                  codecs: CodecSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check the tables of a PAGES payload (`meta`: its first meta_size(n) bytes) against the
    machine size, the negotiated codecs and the `data_len` bytes of data that follow them;
    returns (page index, encoded length, codec id) per page."""
    n = batch_size(meta)
    m = meta_size(n)
    if len(meta) < m:
        raise ProtocolError(f"PAGES record truncated: {len(meta)} bytes, tables need {m}")
    o = _HEAD.size
    idx = np.frombuffer(meta, "<u8", n, o)
    lens = np.frombuffer(meta, "<u4", n, o + 8 * n)
    ids = np.frombuffer(meta, np.uint8, n, o + 12 * n)
    if int(idx.max()) >= npages:
        raise ProtocolError(f"PAGES record names page {int(idx.max())}, RAM has {npages}")
    present = codec_ids(ids)
    bad = set(present) - set(codecs.by_id)
    if bad:
        raise ProtocolError(f"PAGES record uses encoding(s) {sorted(bad)} never negotiated")
    for cid in present:
        problem = codecs.by_id[cid].check(lens if len(present) == 1 else lens[ids == cid])
        if problem:
            raise ProtocolError(
                f"PAGES record has a page whose length does not fit its encoding ({problem})")
    if int(lens.sum(dtype=np.uint64)) != data_len:
        raise ProtocolError(
            f"PAGES record data is {data_len} bytes, its table says {int(lens.sum())}"
        )
    return idx, lens, ids


def decode(payload: memoryview, npages: int, codecs: CodecSet) -> DecodedBatch:
    """Check a PAGES payload against the machine size and the negotiated codecs."""
    m = meta_size(batch_size(payload))
    if len(payload) < m:
        raise ProtocolError(f"PAGES record truncated: {len(payload)} bytes, tables need {m}")
    idx, lens, ids = decode_tables(payload[:m], len(payload) - m, npages, codecs)
    return DecodedBatch(idx, lens, ids, payload[m:])


def apply(batch: DecodedBatch, codecs: CodecSet, placer: PagePlacer) -> None:
    """Hand each codec its pages of a checked batch, to place through `placer` (codecs in
    id order, as their data comes; those in `batch.placed` are in RAM already)."""
    off = 0
    present = codec_ids(batch.ids)
    for cid in present:
        if cid in batch.placed:
            continue
        sel = batch.ids == cid
        one = len(present) == 1
        lens = batch.lens if one else batch.lens[sel]
        size = int(lens.sum(dtype=np.uint64))
        codec = codecs.by_id[cid]
        codec.place(batch.idx if one else batch.idx[sel], lens, batch.data[off : off + size],
                    placer, codecs.state[cid])
        off += size


class RamPlacer:
    """The ordinary placer: pages are stored into the destination's RAM mapping."""

    def __init__(self, ram_pages: np.ndarray) -> None:
        self.ram = ram_pages

    def zero(self, idx: np.ndarray) -> None:
        self.ram[idx] = 0

    def current(self, idx: np.ndarray) -> np.ndarray:
        return self.ram[idx]

    def store(self, idx: np.ndarray, data: np.ndarray) -> None:
        first = int(idx[0])
        if int(idx[-1]) - first == len(idx) - 1 and is_run(idx):
            self.ram[first : first + len(idx)] = data  # one memcpy for a run of pages
        else:
            self.ram[idx] = data


def is_run(idx: np.ndarray) -> bool:
    """True when `idx` is consecutive page numbers in increasing order."""
    return len(idx) < 2 or bool((idx[1:] - idx[:-1] == 1).all())


def codec_ids(ids: np.ndarray) -> list[int]:
    """The codec ids present in a batch's id table, ascending."""
    return np.bincount(ids, minlength=1).nonzero()[0].tolist()
