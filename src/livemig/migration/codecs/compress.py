"""Compression codecs: `zstd` (id 3, zstandard level 1) and `lz4` (id 4, an LZ4 block).

Per batch, not per page: a compression codec claims all the pages of a batch that no earlier
codec took (zero pages are gone by then) and compresses their bytes, back to back in table
order, into one frame. The PAGES table has one length per page and the lengths add up to the
data, so the frame's whole size goes on the LAST claimed page of the batch and 0 on the others
(docs/protocol.md, "Page batches"). `check` accepts exactly that shape (and a frame no larger
than the pages it replaces); `place` decompresses with a hard bound of n × 4096 bytes and
needs exactly that many: a decompression bomb, a short or long frame, trailing bytes or a
corrupt frame are a ProtocolError, never an allocation the peer chose.

zstd frames carry their content size (checked against n × 4096 before anything is decoded);
LZ4 blocks carry no size: they are decoded into a buffer of exactly n × 4096 bytes.

Levels (measured on 64 MiB of binaries and text, 2 MiB batches, this host): zstd -1 ratio
0.38 at 447 MiB/s, 1: 0.34 at 383 MiB/s, 3: 0.31 at 234 MiB/s; lz4 0.47 at 510 MiB/s. For
compress time plus wire time, level 1 ties -1 at 1 Gbit/s and wins below it; 3 loses
everywhere on CPU. Random data costs little to try: both give up at ~5 GB/s (0.4 ms for a
2 MiB batch).

A batch whose frame is not below 90 % of the pages' size is not claimed (`raw` takes it):
incompressible data costs only the attempt, and nearly-incompressible data is not worth
the destination's decompression. `--compress zstd` / `lz4` tries every batch.

`--compress auto` offers both (zstd first: the better ratio; then lz4: faster) and compresses
only while the link, not the CPU, is the bottleneck, judged per batch from rates measured
during the migration:

    compress when  C × (1 − r) > L

C is the codec's compression throughput (bytes in per second of compress time) and r its
ratio (bytes out / bytes in), decayed sums over its recent attempts; L is the link rate in
bytes per second. Compressing a batch of B bytes costs B / C seconds of CPU and saves
(1 − r) × B / L seconds of wire time; the rule says the batch goes out sooner compressed even
when none of the compression overlaps the previous batch's send (the source compresses,
then sends; a socket buffer or the page-stream queues let some overlap, so the rule errs
towards sending raw). In words: compression throughput × the fraction it saves > link.

L, without help from the source: claim is called once per batch sent, so the time between
successive claims of a session holds the previous batch's send. After a batch that went raw,
"its bytes / (that time − the time spent trying to compress it)" is a sample; L is the median
of the last 8 (a round's end or a pause makes one slow sample, not a slow link). A compressed
batch gives no sample (its send may hide behind the compression). zstd and lz4 share one
meter per session, so a batch either took counts once. A source may instead report each send,
`state.observe(bytes_on_wire, seconds)`: then those are the samples.

Measuring as it goes: with no C yet the codec compresses (that measures C and r); with no L
yet it declines (the raw batch measures L). Declining, C and r age: it compresses one batch
anyway once 32 × the last attempt's time has passed, so probing costs at most ~3 % of the
time. Compressing, L ages: after 64 compressed batches in a row one goes raw.
`stats`: batches compressed, skipped (tried, not below 90 %), declined (auto, not tried),
probes, bytes in and out, the ratio in percent and, for auto, the last C and L (bytes/s).
"""

from __future__ import annotations

import statistics
import threading
import time
import weakref
from abc import abstractmethod
from collections import deque
from typing import Any

import lz4.block
import numpy as np
import zstandard

from livemig.contract import PAGE_SIZE
from livemig.migration.codecs.base import Claim, Codec, PagePlacer
from livemig.migration.errors import ProtocolError
from livemig.migration.options import MigrationOptions

ZSTD_LEVEL = 1
CLAIM_BELOW = 0.90  # claim a batch only when its frame is below this fraction of the pages
DECAY = 0.7  # weight of the past in C and r at each attempt
LINK_SAMPLES = 8  # L is the median of this many per-batch samples
PROBE_SPACING = 32  # declining, compress once per this many times the last attempt's cost
LINK_PROBE_EVERY = 64  # compressing, send one batch raw after this many compressed in a row


class _LinkMeter:
    """One session's link rate, seen from the claims of its compression codecs (shared by
    zstd and lz4, so a batch counts once) or reported by the source (`observe`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batch: np.ndarray | None = None  # the batch being encoded (its idx array)
        self.start = 0.0
        self.busy = 0.0  # seconds spent compressing it
        self.wire = 0  # its bytes on the wire, as far as the codecs know
        self.compressed = False  # a compression codec took it
        self.in_row = 0  # batches compressed since the last one that went raw
        self.samples: deque[float] = deque(maxlen=LINK_SAMPLES)
        self.observed = False  # the source reports its sends: no estimate from claims

    def begin(self, idx: np.ndarray, now: float) -> None:
        """A claim on batch `idx`: when it is a new batch, the previous one ends here."""
        with self.lock:
            if idx is self.batch:
                return
            if self.batch is not None:
                spent = now - self.start - self.busy
                if not self.observed and not self.compressed and self.wire > 0 and spent > 0:
                    self.samples.append(self.wire / spent)
                self.in_row = self.in_row + 1 if self.compressed else 0
            self.batch, self.start, self.busy, self.wire = idx, now, 0.0, 0
            self.compressed = False

    def attempted(self, seconds: float, wire: int, compressed: bool) -> None:
        with self.lock:
            self.busy += seconds
            self.wire = wire
            self.compressed = compressed

    def rate(self) -> float | None:
        with self.lock:
            return statistics.median(self.samples) if self.samples else None


_meters: dict[int, _LinkMeter] = {}  # by id() of the session's options, while they live
_meters_lock = threading.Lock()


def _meter_for(owner: object) -> _LinkMeter:
    """The link meter of the session whose options are `owner` (zstd's and lz4's states
    share it)."""
    with _meters_lock:
        m = _meters.get(id(owner))
        if m is None:
            m = _meters[id(owner)] = _LinkMeter()
            weakref.finalize(owner, _meters.pop, id(owner), None)
        return m


class CompressState:
    """Per-session state of one compression codec: counters, and in `auto` mode the measured
    compression throughput, ratio and link rate that decide each batch."""

    def __init__(self, auto: bool = False, owner: object = None) -> None:
        self.auto = auto
        self.meter = _meter_for(owner) if auto and owner is not None else _LinkMeter()
        self.lock = threading.Lock()
        self.local = threading.local()  # compressor / decompressor objects: one per thread
        self.batches = 0  # compressed and claimed (source), decompressed (destination)
        self.skipped = 0  # tried, not below CLAIM_BELOW: left to raw
        self.declined = 0  # auto: not tried (the link is fast, or being measured)
        self.probes = 0  # auto: tried although the rule said no, to refresh C and r
        self.bytes_in = 0
        self.bytes_out = 0
        self.s_in = 0.0  # decayed sums over attempts: bytes in, bytes out, seconds
        self.s_out = 0.0
        self.s_t = 0.0
        self.next_probe = 0.0
        self.last_link: float | None = None  # L at the last decision

    # -- the link ---------------------------------------------------------------------------

    def observe(self, bytes_on_wire: int, seconds: float) -> None:
        """The source sent `bytes_on_wire` in `seconds` (a batch; the session's rate): a true
        link sample. Once called, claim intervals are no longer samples."""
        with self.meter.lock:
            self.meter.observed = True
            if bytes_on_wire > 0 and seconds > 0:
                self.meter.samples.append(bytes_on_wire / seconds)

    def link_rate(self) -> float | None:
        """L: bytes per second the link takes (None: not measured yet)."""
        return self.meter.rate()

    # -- compression ------------------------------------------------------------------------

    def compress_rate(self) -> float | None:
        """C: bytes in per second of compress time (None: never compressed)."""
        with self.lock:
            return self.s_in / self.s_t if self.s_t > 0 else None

    def ratio(self) -> float | None:
        """r: bytes out / bytes in."""
        with self.lock:
            return self.s_out / self.s_in if self.s_in > 0 else None

    def worth_it(self, now: float) -> bool:
        """Auto: compress this batch? See the module docstring."""
        link = self.link_rate()
        in_row = self.meter.in_row
        with self.lock:
            self.last_link = link
            if self.s_t <= 0 or self.s_in <= 0:
                return True  # C and r unknown: this attempt measures them
            if link is not None and (self.meter.observed or in_row < LINK_PROBE_EVERY):
                if self.s_in / self.s_t * (1 - self.s_out / self.s_in) > link:
                    return True
                if now >= self.next_probe:
                    self.probes += 1
                    return True
            self.declined += 1  # L unknown or old, or the link is faster than compressing
            return False

    def attempted(self, n_in: int, n_out: int, seconds: float, claimed: bool) -> None:
        with self.lock:
            self.s_in = self.s_in * DECAY + n_in
            self.s_out = self.s_out * DECAY + min(n_out, n_in)
            self.s_t = self.s_t * DECAY + max(seconds, 1e-9)
            self.next_probe = time.monotonic() + PROBE_SPACING * seconds
            if claimed:
                self.batches += 1
                self.bytes_in += n_in
                self.bytes_out += n_out
            else:
                self.skipped += 1

    def counters(self) -> dict[str, int]:
        with self.lock:
            out = {"batches": self.batches, "skipped": self.skipped,
                   "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                   "ratio_pct": round(100 * self.bytes_out / self.bytes_in)
                   if self.bytes_in else 0}
            if self.auto:
                out["declined"] = self.declined
                out["probes"] = self.probes
        if self.auto:
            c, link = self.compress_rate(), self.last_link
            out["compress_rate"] = round(c) if c else 0
            out["link_rate"] = round(link) if link else 0
        return out


class CompressCodec(Codec):
    """A batch's remaining pages as one compressed frame, its size on the last page."""

    @abstractmethod
    def _compress(self, state: CompressState, data: np.ndarray) -> bytes:
        """One frame of `data` ((n, PAGE_SIZE) uint8, C-contiguous)."""

    @abstractmethod
    def _decompress(self, state: CompressState, frame: memoryview, size: int) -> bytes:
        """`size` bytes from `frame`, never more (ProtocolError when it does not decode)."""

    def enabled(self, opts: MigrationOptions) -> bool:
        return opts.compress in (self.name, "auto")

    def new_state(self, opts: MigrationOptions | None,
                  params: dict[str, Any] | None) -> CompressState:
        auto = opts is not None and opts.compress == "auto"
        return CompressState(auto, opts)

    def stats(self, state: Any) -> dict[str, int]:
        return state.counters() if isinstance(state, CompressState) else {}

    def claim(self, idx: np.ndarray, pages: np.ndarray, todo: np.ndarray, state: Any) -> Claim:
        st: CompressState = state
        n = int(np.count_nonzero(todo))
        none = Claim(np.zeros(len(todo), dtype=bool), np.zeros(0, dtype=np.uint32))
        if st.auto:  # every codec sees every batch: the meter counts them all
            st.meter.begin(idx, time.monotonic())
        if n == 0:
            return none
        size = n * PAGE_SIZE
        if st.auto:
            if not st.worth_it(time.monotonic()):
                st.meter.attempted(0.0, size, False)  # raw takes it, unless lz4 does
                return none
        data = pages if n == len(pages) else pages[todo]
        t0 = time.perf_counter()
        frame = self._compress(st, data)
        seconds = time.perf_counter() - t0
        claimed = len(frame) < CLAIM_BELOW * size
        st.attempted(size, len(frame), seconds, claimed)
        if st.auto:
            st.meter.attempted(seconds, len(frame) if claimed else size, claimed)
        if not claimed:
            return none
        lens = np.zeros(n, dtype=np.uint32)
        lens[-1] = len(frame)
        return Claim(todo.copy(), lens, [frame])

    def check(self, lens: np.ndarray) -> str | None:
        if len(lens) == 0:
            return None
        if np.any(lens[:-1]):
            return f"a {self.name} batch has data on a page other than its last"
        if not 0 < int(lens[-1]) <= len(lens) * PAGE_SIZE:
            return f"a {self.name} frame of {int(lens[-1])} bytes for {len(lens)} page(s)"
        return None

    def place(self, idx: np.ndarray, lens: np.ndarray, data: memoryview, placer: PagePlacer,
              state: Any) -> None:
        st = state if isinstance(state, CompressState) else CompressState()
        size = len(idx) * PAGE_SIZE
        out = self._decompress(st, data, size)
        if len(out) != size:
            raise ProtocolError(f"a {self.name} frame decompressed to {len(out)} bytes,"
                                f" its {len(idx)} page(s) need {size}")
        placer.store(idx, np.frombuffer(out, np.uint8).reshape(-1, PAGE_SIZE))
        with st.lock:
            st.batches += 1
            st.bytes_in += size
            st.bytes_out += len(data)


class ZstdCodec(CompressCodec):
    """zstandard, one frame per batch with its content size in the header."""

    id = 3
    name = "zstd"

    def _compress(self, state: CompressState, data: np.ndarray) -> bytes:
        c = getattr(state.local, "c", None)
        if c is None:
            c = state.local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return c.compress(data.data.cast("B"))

    def _decompress(self, state: CompressState, frame: memoryview, size: int) -> bytes:
        d = getattr(state.local, "d", None)
        if d is None:
            d = state.local.d = zstandard.ZstdDecompressor()
        try:
            declared = zstandard.get_frame_parameters(frame).content_size
            if declared != size:  # checked before decoding: the output is never larger
                said = "no size" if declared < 0 or declared >= 1 << 63 else f"{declared} bytes"
                raise ProtocolError(f"a zstd frame declares {said}, its pages need {size}")
            return d.decompress(frame, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise ProtocolError(f"a zstd frame does not decompress: {e}") from None


class Lz4Codec(CompressCodec):
    """An LZ4 block (no header: the size is the batch's pages)."""

    id = 4
    name = "lz4"

    def _compress(self, state: CompressState, data: np.ndarray) -> bytes:
        return lz4.block.compress(data, store_size=False)

    def _decompress(self, state: CompressState, frame: memoryview, size: int) -> bytes:
        try:  # decoded into a buffer of `size` bytes: it cannot grow past it
            return lz4.block.decompress(frame, uncompressed_size=size)
        except lz4.block.LZ4BlockError as e:
            raise ProtocolError(f"an lz4 frame does not decompress: {e}") from None
