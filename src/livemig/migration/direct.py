"""Receiving PAGES straight into guest RAM (the destination, before COMMIT).

A PAGES payload starts with its tables; once they are read and checked (`pages.decode_tables`),
the raw pages' bytes, the first data of the record (`zero` pages have none, and raw is codec
1), go from the socket straight into their pages of the RAM mapping: one `recvmsg_into`
scatters up to 512 runs of consecutive pages. Only the other codecs' bytes land in the
reader's buffer, to be decoded and placed as usual. This takes the receive buffer and a
memcpy of every raw page off the receive path.

The payload CRC still covers exactly the bytes sent: it is computed over the tables, each run
right after it is received, and the rest, and checked once the whole record is in. So a
damaged record is refused as before, only after its raw pages were written into RAM. That is
safe only while nothing can run on or read those pages yet: here, before COMMIT, where the
machine never runs and is discarded on any error (a refused record fails the migration, and
the source resumes). Post-copy pages after COMMIT never come this way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zlib_ng import zlib_ng as zlib

from livemig.contract import PAGE_SIZE
from livemig.migration.codecs import CodecSet
from livemig.migration.codecs.raw import RawCodec
from livemig.migration.errors import ProtocolError
from livemig.migration.pages import DecodedBatch, batch_size, decode_tables, is_run, meta_size
from livemig.migration.wire import Header, RecordReader

RAW = RawCodec.id


@dataclass
class PendingBatch:
    """A PAGES record whose tables are read and checked, its data still on the socket."""

    head: Header
    idx: np.ndarray
    lens: np.ndarray
    ids: np.ndarray
    buf: memoryview  # the reader's buffer for the payload (tables first)
    meta: int  # bytes of tables
    crc: int  # CRC of the tables


class DirectReceiver:
    """Reads PAGES records from a RecordReader into `ram` ((pages, PAGE_SIZE) uint8)."""

    def __init__(self, ram: np.ndarray, codecs: CodecSet) -> None:
        self.npages = len(ram)
        self.codecs = codecs
        self.flat = ram.reshape(-1).data.cast("B")

    def begin(self, reader: RecordReader, head: Header, deadline: float | None) -> PendingBatch:
        """Read and check the tables of the PAGES record `head` announces."""
        buf = reader.payload_buffer(head.length)
        what = "PAGES record"
        if head.length < 8:
            raise ProtocolError(f"PAGES record too short ({head.length} bytes)")
        reader.fill(buf[:8], what, deadline)
        m = meta_size(batch_size(buf[:8]))
        if head.length < m:
            raise ProtocolError(f"PAGES record truncated: {head.length} bytes, tables need {m}")
        reader.fill(buf[8:m], what, deadline)
        idx, lens, ids = decode_tables(buf[:m], head.length - m, self.npages, self.codecs)
        return PendingBatch(head, idx, lens, ids, buf, m, zlib.crc32(buf[:m]))

    def finish(self, reader: RecordReader, p: PendingBatch,
               deadline: float | None) -> DecodedBatch:
        """Receive the data of `p`: raw pages into RAM, the rest into the buffer; check the
        CRC. The batch returned leaves only the other codecs to place."""
        raw = p.ids == RAW
        crc = p.crc
        nraw = int(np.count_nonzero(raw))
        if nraw:
            views = self._runs(p.idx if nraw == len(p.idx) else p.idx[raw])
            reader.fill_many(views, "PAGES record", deadline)
            for v in views:
                crc = zlib.crc32(v, crc)
        rest = p.buf[p.meta + nraw * PAGE_SIZE : p.head.length]
        if rest.nbytes:
            reader.fill(rest, "PAGES record", deadline)
            crc = zlib.crc32(rest, crc)
        p.head.check(crc)
        return DecodedBatch(p.idx, p.lens, p.ids, rest, frozenset({RAW}) if nraw else frozenset())

    def read(self, reader: RecordReader, head: Header, deadline: float | None) -> DecodedBatch:
        """`begin` and `finish` at once."""
        return self.finish(reader, self.begin(reader, head, deadline), deadline)

    def _runs(self, idx: np.ndarray) -> list[memoryview]:
        """Views of RAM for `idx` (page numbers in table order), one per run of consecutive
        pages."""
        first = int(idx[0])
        if int(idx[-1]) - first == len(idx) - 1 and is_run(idx):
            return [self.flat[first * PAGE_SIZE : (first + len(idx)) * PAGE_SIZE]]
        cut = np.flatnonzero(np.diff(idx) != 1) + 1
        starts = np.concatenate(([0], cut)).tolist()
        ends = np.concatenate((cut, [len(idx)])).tolist()
        pages = idx.tolist()
        return [self.flat[pages[a] * PAGE_SIZE : (pages[a] + b - a) * PAGE_SIZE]
                for a, b in zip(starts, ends, strict=True)]
