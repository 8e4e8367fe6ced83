"""Post-copy's source side after COMMIT: the page server.

The guest is paused here for good, so RAM is frozen: every page is sent straight from the
mapping, and a page sent twice (pushed and pulled) is the same both times. Two paths:

- requests: the destination's PAGE_REQUEST records arrive on the return path and are answered
  on the `urgent` connection at once, on the return path's thread, so a fault's page never
  queues behind bulk pushes (QEMU's postcopy-preempt);
- pushes: everything the destination still lacks goes on the main connection in page order,
  restarting after the most recently requested page (what the guest touches next is likely
  near what it touched last).

Only the stateless codecs (zero, raw) are used after COMMIT: the destination's guest writes
its own pages from then on, so a delta or a reference against an earlier copy could point at
content that no longer exists there. The server keeps every page until the destination says
COMPLETE; a broken link pauses it until `recover` gives it new connections and the
destination's MISSING list.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import lz4.block
import numpy as np

from livemig.migration import faultpath
from livemig.migration.channels import Channel
from livemig.migration.codecs import CodecSet
from livemig.migration.errors import ConnectionLost, ProtocolError
from livemig.migration.pages import MAX_BATCH, BatchEncoder, EncodedBatch
from livemig.migration.ratelimit import RateLimiter
from livemig.migration.wire import Record, RecordType

STATELESS = ("zero", "raw")
MAX_REQUEST = 4096  # pages one PAGE_REQUEST may name


def stateless_codecs() -> CodecSet:
    """The codecs pages may use after COMMIT."""
    return CodecSet(STATELESS)


def decode_request(payload: memoryview, npages: int) -> np.ndarray:
    """Page numbers of a PAGE_REQUEST (little-endian u64 each); ProtocolError if bad."""
    if len(payload) % 8 or not 0 < len(payload) // 8 <= MAX_REQUEST:
        raise ProtocolError(f"PAGE_REQUEST of {len(payload)} bytes")
    idx = np.frombuffer(payload, "<u8").astype(np.int64)
    if int(idx.max()) >= npages:
        raise ProtocolError(f"PAGE_REQUEST names page {int(idx.max())}, RAM has {npages}")
    return np.unique(idx)


def encode_request(pages: list[int]) -> bytes:
    return np.asarray(pages, dtype="<u8").tobytes()


def pack_bitmap(mask: np.ndarray) -> bytes:
    """A bool per page as it travels (STATE and PREPARE `owed`, MISSING): the bitmap packed
    little-endian, then an lz4 block; a GiB's 32 KiB bitmap of a few runs takes ~200 bytes,
    which keeps STATE small in the downtime."""
    return bytes(lz4.block.compress(np.packbits(mask, bitorder="little").tobytes(),
                                    store_size=False))


def unpack_bitmap(data: object, npages: int, what: str) -> np.ndarray:
    """A bool per page from `pack_bitmap` bytes; ProtocolError when they do not decode to
    exactly the bitmap of `npages` (the size is known here, so nothing can decode larger)."""
    size = (npages + 7) // 8
    if not isinstance(data, bytes | memoryview):
        raise ProtocolError(f"{what}: page bitmap is not a byte string")
    try:
        raw = lz4.block.decompress(bytes(data), uncompressed_size=size)
    except lz4.block.LZ4BlockError as e:
        raise ProtocolError(f"{what}: page bitmap does not fit {npages} pages ({e})") from e
    if len(raw) != size:
        raise ProtocolError(f"{what}: page bitmap does not fit {npages} pages")
    return np.unpackbits(np.frombuffer(raw, np.uint8), count=npages,
                         bitorder="little").astype(bool)


@dataclass
class ServerCounts:
    """What the page server sent: pages pushed in order, pages sent because a fault asked."""

    pushed: int = 0
    pulled: int = 0
    requests: int = 0
    pulled_ahead: int = 0  # pulled while still queued for a push: the request jumped the queue
    queue_at_pull: int = 0  # most pages queued for pushing when a request was served
    bytes_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, pushed: int, pulled: int, nbytes: int) -> None:
        with self.lock:
            self.pushed += pushed
            self.pulled += pulled
            self.bytes_sent += nbytes


class PageServer:
    """Serves and pushes the pages `owed` (bool per page) from frozen RAM `ram`."""

    def __init__(self, ram: np.ndarray, owed: np.ndarray, limiter: RateLimiter) -> None:
        self.ram = ram
        self.owed = owed.copy()  # what the destination lacks, as far as this side knows
        self.limiter = limiter
        self.counts = ServerCounts()
        self._sent = np.zeros(len(owed), dtype=bool)  # since the last (re)connection
        self._queued = int(np.count_nonzero(self.owed))  # owed and not yet sent
        self._cursor = 0
        self._lock = threading.Lock()
        self._push_enc = BatchEncoder(ram, stateless_codecs())
        self._pull_enc = BatchEncoder(ram, stateless_codecs())
        self.urgent: Channel | None = None
        self._native: faultpath.RequestServer | None = None
        self._native_cursor = 0

    @property
    def npages(self) -> int:
        return len(self.owed)

    def reconnected(self, urgent: Channel, missing: np.ndarray | None) -> None:
        """New connections after a break: the destination lacks `missing` (None: as before)."""
        with self._lock:
            self.urgent = urgent
            if missing is not None:
                self.owed = missing
            self._sent[:] = False
            self._queued = int(np.count_nonzero(self.owed))
            self._cursor = 0

    def serve_natively(self) -> None:
        """Answer requests coming on the urgent connection with the C loop (faultpath.py),
        until `stop_native`."""
        sock = faultpath.plain_socket(self.urgent)
        assert sock is not None
        self._native = faultpath.RequestServer(sock, int(self.ram.ctypes.data), self.owed,
                                               self._sent)

    def stop_native(self) -> None:
        """End the C loop; what it sent joins the counts. Requests come on the return path
        from now on (the destination's Python path, as after a recovery)."""
        server, self._native = self._native, None
        if server is None:
            return
        server.stop()
        c = server.counters
        with self.counts.lock:
            self.counts.requests += int(c[faultpath.S_REQUESTS])
            self.counts.pulled += int(c[faultpath.S_PULLED])
            self.counts.bytes_sent += int(c[faultpath.S_BYTES])
            self.counts.pulled_ahead += int(c[faultpath.S_AHEAD])
            self.counts.queue_at_pull = max(self.counts.queue_at_pull,
                                            int(c[faultpath.S_QUEUE_MAX]))

    def _follow_native(self, todo: np.ndarray) -> None:
        """Under the lock: restart pushes after the C loop's latest answer, and tell it how
        many pages are queued (for `queue_at_pull`)."""
        server = self._native
        if server is None:
            return
        c = server.counters
        cursor = int(c[faultpath.S_CURSOR])
        if cursor != self._native_cursor:
            self._native_cursor = cursor
            self._cursor = cursor % self.npages
        c[faultpath.S_QUEUED] = int(np.count_nonzero(todo))

    def on_request(self, rec: Record) -> None:
        """A PAGE_REQUEST: send those pages on the urgent connection now."""
        idx = decode_request(rec.payload, self.npages)
        assert self.urgent is not None
        with self._lock:  # per page, not per RAM: this is on every fault's path
            ahead = int(np.count_nonzero(self.owed[idx] & ~self._sent[idx]))
            waiting = self._queued
            self._queued -= ahead
            self._sent[idx] = True
        with self.counts.lock:
            self.counts.pulled_ahead += ahead
            self.counts.queue_at_pull = max(self.counts.queue_at_pull, waiting)
        for i in range(0, len(idx), MAX_BATCH):
            part = idx[i : i + MAX_BATCH]
            b = self._pull_enc.encode(part, frozen=True)
            try:
                n = self.urgent.send(RecordType.PAGES, b.meta, *b.data)
            except ConnectionLost:
                # Not the return path's failure: the destination may have everything and be
                # closing (its COMPLETE is still to be read), or the whole link broke, which
                # the return path and the pushes see for themselves.
                return
            finally:
                self._pull_enc.release(b)
            self.counts.add(0, len(part), n)
        with self._lock:
            self._cursor = int(idx[-1]) + 1
            self.counts.requests += 1

    def next_push(self) -> EncodedBatch | None:
        """The next batch of pages owed and not yet sent, from the cursor on (wrapping)."""
        with self._lock:
            todo = self.owed & ~self._sent
            self._follow_native(todo)
            after = np.flatnonzero(todo[self._cursor :])[:MAX_BATCH] + self._cursor
            if len(after) < MAX_BATCH:
                before = np.flatnonzero(todo[: self._cursor])[: MAX_BATCH - len(after)]
                after = np.concatenate([after, before]) if len(before) else after
            if not len(after):
                return None
            idx = np.sort(after)
            self._sent[idx] = True
            self._queued -= len(idx)
            self._cursor = int(idx[-1]) + 1 if int(idx[-1]) + 1 < self.npages else 0
        return self._push_enc.encode(idx, frozen=True)

    def push(self, main: Channel, stop: threading.Event, check: Callable[[], None]) -> None:
        """Push every page owed and not yet sent on `main`; returns when none is left.
        `check` raises when the return path broke (the pushes alone would not notice)."""

        def woken() -> bool:  # during the cap's sleep: the link broke, or no push is needed
            check()
            return stop.is_set()

        while not stop.is_set():
            check()
            b = self.next_push()
            if b is None:
                return
            try:
                n = main.send(RecordType.PAGES, b.meta, *b.data)
            finally:
                self._push_enc.release(b)
            self.counts.add(b.pages, 0, n)
            self.limiter.spent(n, woken)
