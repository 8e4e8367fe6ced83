"""Page batches: the PAGES record and its per-page encodings.

PAGES payload, little-endian, n = number of pages (1..MAX_BATCH):

    u32      n
    u32      reserved, 0
    u64[n]   page index (guest-physical offset / page size)
    u32[n]   encoded length of each page's data
    u8[n]    encoding of each page (Encoding)
    pad      zero bytes up to a multiple of 8
    data     the encoded pages, in order, back to back

Each encoding defines its data: ZERO has none (the page is all zero), RAW has the page's 4096
bytes. The length table lets a receiver walk a batch whose encodings have variable lengths
(compression, deltas, references), so new encodings need no new record type. Only encodings
negotiated in the hello may appear.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from livemig.contract import PAGE_SIZE
from livemig.migration.errors import ProtocolError
from livemig.migration.scan import nonzero_in

MAX_BATCH = 512  # pages per PAGES record (2 MiB of raw data; measured best of 256..1024)
_HEAD = struct.Struct("<II")


class Encoding(enum.IntEnum):
    """Per-page encodings; ids are stable, names are what the hello negotiates."""

    ZERO = 0
    RAW = 1

    @property
    def wire_name(self) -> str:
        return self.name.lower()


SUPPORTED = [e.wire_name for e in Encoding]


def parse_encodings(names: Iterable[str]) -> set[Encoding]:
    """The encodings among `names` that this livemig knows."""
    by_name = {e.wire_name: e for e in Encoding}
    return {by_name[n] for n in names if n in by_name}


def meta_size(n: int) -> int:
    """Bytes before the data of an n-page batch (header, tables, padding)."""
    raw = _HEAD.size + n * (8 + 4 + 1)
    return (raw + 7) & ~7


@dataclass
class EncodedBatch:
    """A PAGES payload ready to send: `meta` then `data` (a view on the encoder's buffer)."""

    meta: bytes
    data: memoryview
    pages: int
    zero: int
    raw: int


class BatchEncoder:
    """Copies pages out of live RAM into a private buffer and encodes them.

    The copy is taken first so that the CRC and the bytes sent are of the same snapshot even
    while the guest keeps writing (the page is dirty again then, and will be re-sent).
    """

    def __init__(self, ram_pages: np.ndarray) -> None:
        self.ram = ram_pages
        self._buf = np.empty((MAX_BATCH, PAGE_SIZE), dtype=np.uint8)

    def encode(self, idx: np.ndarray, frozen: bool = False) -> EncodedBatch:
        """Encode pages `idx` (at most MAX_BATCH) as ZERO or RAW.

        `frozen` says the guest is paused: a run of pages is then sent straight from RAM,
        without the private copy, since nothing can change it between CRC and send.
        """
        n = len(idx)
        if not 0 < n <= MAX_BATCH:
            raise ValueError(f"batch of {n} pages")
        copy = self._buf[:n]
        first = int(idx[0])
        run = int(idx[-1]) - first == n - 1 and is_run(idx)
        if run and frozen:
            copy = self.ram[first : first + n]
        elif run:
            copy[:] = self.ram[first : first + n]  # one memcpy for a run of pages
        else:
            np.take(self.ram, idx, axis=0, out=copy)
        nonzero = nonzero_in(copy)
        nraw = int(np.count_nonzero(nonzero))
        data = copy if nraw == n else copy[nonzero]
        enc = nonzero.astype(np.uint8)  # RAW = 1, ZERO = 0
        lens = enc.astype(np.uint32) * PAGE_SIZE
        meta = bytearray(meta_size(n))
        _HEAD.pack_into(meta, 0, n, 0)
        o = _HEAD.size
        meta[o : o + 8 * n] = idx.astype("<u8").tobytes()
        meta[o + 8 * n : o + 12 * n] = lens.astype("<u4").tobytes()
        meta[o + 12 * n : o + 13 * n] = enc.tobytes()
        return EncodedBatch(bytes(meta), data.data.cast("B"), n, n - nraw, nraw)


@dataclass
class DecodedBatch:
    """A checked PAGES payload: arrays over the receive buffer."""

    idx: np.ndarray
    lens: np.ndarray
    enc: np.ndarray
    data: memoryview

    def count(self, e: Encoding) -> int:
        return int(np.count_nonzero(self.enc == e))


def decode(payload: memoryview, npages: int, allowed: set[Encoding]) -> DecodedBatch:
    """Check a PAGES payload against the machine size and negotiated encodings."""
    if len(payload) < _HEAD.size:
        raise ProtocolError(f"PAGES record too short ({len(payload)} bytes)")
    n, reserved = _HEAD.unpack_from(payload)
    if reserved != 0 or not 0 < n <= MAX_BATCH:
        raise ProtocolError(f"PAGES record with bad header (count {n}, reserved {reserved})")
    m = meta_size(n)
    if len(payload) < m:
        raise ProtocolError(f"PAGES record truncated: {len(payload)} bytes, tables need {m}")
    o = _HEAD.size
    idx = np.frombuffer(payload, "<u8", n, o)
    lens = np.frombuffer(payload, "<u4", n, o + 8 * n)
    enc = np.frombuffer(payload, np.uint8, n, o + 12 * n)
    if int(idx.max()) >= npages:
        raise ProtocolError(f"PAGES record names page {int(idx.max())}, RAM has {npages}")
    present = set(np.unique(enc).tolist())
    bad = present - {int(e) for e in allowed}
    if bad:
        raise ProtocolError(f"PAGES record uses encoding(s) {sorted(bad)} never negotiated")
    expect = np.where(enc == Encoding.RAW, PAGE_SIZE, 0)
    fixed = (enc == Encoding.RAW) | (enc == Encoding.ZERO)
    if np.any(fixed & (lens != expect)):
        raise ProtocolError("PAGES record has a page whose length does not fit its encoding")
    if int(lens.sum(dtype=np.uint64)) != len(payload) - m:
        raise ProtocolError(
            f"PAGES record data is {len(payload) - m} bytes, its table says {int(lens.sum())}"
        )
    return DecodedBatch(idx, lens, enc, payload[m:])


def apply(batch: DecodedBatch, ram_pages: np.ndarray) -> None:
    """Write a decoded batch into RAM (destination side; nothing runs on it yet)."""
    raw = batch.enc == Encoding.RAW
    zero = batch.enc == Encoding.ZERO
    if np.any(zero):
        ram_pages[batch.idx[zero]] = 0
    if np.any(raw):
        data = np.frombuffer(batch.data, np.uint8).reshape(-1, PAGE_SIZE)
        idx = batch.idx[raw]
        first = int(idx[0])
        if int(idx[-1]) - first == len(idx) - 1 and is_run(idx):
            ram_pages[first : first + len(idx)] = data  # one memcpy for a run of pages
        else:
            ram_pages[idx] = data


def is_run(idx: np.ndarray) -> bool:
    """True when `idx` is consecutive page numbers in increasing order."""
    return len(idx) < 2 or bool(np.all(np.diff(idx) == 1))
