"""The `xbzrle` codec (id 2): a page sent again goes as a delta against its previous copy.

QEMU's XBZRLE idea (runs of unchanged bytes and runs of new bytes, ULEB128 lengths), laid out
so that both sides work on a whole batch with numpy: a page's run lengths come first, its new
bytes after them. One page's delta, every length a ULEB128 of at most 2 bytes (all are
<= 4096):

    r                   number of runs of new bytes (0: the page did not change)
    r x (skip, len)     skip >= 0 unchanged bytes after the previous run (from byte 0 for the
                        first), then len >= 1 new bytes; the runs end at most at byte 4096
    new bytes           sum(len) bytes: the runs' new bytes, in order; nothing after them

Unchanged gaps of 1 or 2 bytes between runs are sent inside one run (as cheap as the two
lengths they save). A delta of 3/4 of a page or more is not sent (an overflow: the page is
left to the next codec).

Source: a bounded cache (`xbzrle_cache` bytes, whole pages, evicted in insertion order) holds
what the destination holds of the pages it saw in batches: every page of every batch is
recorded as it is in the batch (whichever codec sends it, all send it exactly), zero pages
as a mark without a copy. A page in the cache goes as a delta (a hit); one not in it is a
miss. The encoder shows every codec every batch, so the cache learns pages whichever codec
sends them; zero pages are left to `zero`. Destination: each delta is decoded against
`placer.current(idx)`, the page as earlier batches left it: batches must be placed in the
order they were encoded (one channel keeps it; page streams place batches in order too).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livemig.contract import PAGE_SIZE
from livemig.migration.codecs.base import Claim, Codec, PagePlacer
from livemig.migration.errors import ProtocolError
from livemig.migration.options import MigrationOptions
from livemig.migration.scan import nonzero_in

OVERFLOW = PAGE_SIZE * 3 // 4  # a delta this long or longer is not sent
MERGE_GAP = 2  # unchanged gaps up to this long are sent inside a run
_ABSENT, _ZERO = -1, -2  # page_slot values besides a slot number
_WORDS = PAGE_SIZE // 8


def _uleb_size(v: np.ndarray) -> np.ndarray:
    """Bytes of the ULEB128 of each value (all < 2**14)."""
    return 1 + (v >= 128).astype(np.int64)


def _excl_cumsum(a: np.ndarray) -> np.ndarray:
    out = np.zeros(len(a), dtype=np.int64)
    if len(a) > 1:
        np.cumsum(a[:-1], out=out[1:])
    return out


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop."""
    total = int(lens.sum())
    return np.repeat(starts - _excl_cumsum(lens), lens) + np.arange(total, dtype=np.int64)


def encode(cur: np.ndarray, old: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deltas of pages `cur` against `old` (both (k, PAGE_SIZE) uint8; None: zero pages).

    Returns (ok, lens, data): which pages have a delta shorter than OVERFLOW, their lengths,
    and their deltas back to back (uint8), in page order."""
    k = len(cur)
    cur = np.ascontiguousarray(cur)
    # changed words first (cheap), then the changed bytes of those words only
    if old is None:
        x = cur.view(np.uint64)  # copied below only if it must be changed
    else:
        x = cur.view(np.uint64) ^ np.ascontiguousarray(old).view(np.uint64)
    fits = np.ones(k, dtype=bool)
    doubt = np.flatnonzero(np.count_nonzero(x, axis=1) >= OVERFLOW // 8)
    if len(doubt):  # enough changed words to hold too many changed bytes: count those
        xd = x if len(doubt) == k else np.take(x, doubt, axis=0)
        changed = (xd.view(np.uint8) != 0).sum(axis=1, dtype=np.int32)
        fits[doubt] = changed < OVERFLOW  # more new bytes than that: an overflow anyway
        if old is None:
            x = x.copy()
        x[~fits] = 0
    x = x.reshape(-1)
    words = np.flatnonzero(x != 0)  # page * WORDS + word (a bool mask: 7x faster than u64)
    nzb = x[words].view(np.uint8).reshape(-1, 8) != 0
    bi = np.flatnonzero(nzb)
    g = words[bi >> 3] * 8 + (bi & 7)  # changed bytes: page * PAGE_SIZE + offset, ascending
    # runs: a changed byte more than MERGE_GAP unchanged bytes after the previous one, or on
    # another page, starts one
    gpage = g // PAGE_SIZE
    brk = (np.diff(g) > MERGE_GAP + 1) | (np.diff(gpage) != 0)
    firsts = np.flatnonzero(np.r_[True, brk]) if len(g) else g
    lasts = np.flatnonzero(np.r_[brk, True]) if len(g) else g
    wrow = gpage[firsts]
    start = g[firsts] - wrow * PAGE_SIZE
    end = g[lasts] + 1 - wrow * PAGE_SIZE
    newpage = np.r_[True, wrow[1:] != wrow[:-1]] if len(wrow) else np.zeros(0, dtype=bool)
    prev_end = np.where(newpage, 0, np.r_[0, end[:-1]]) if len(end) else end
    skip = start - prev_end
    ln = end - start
    r = np.bincount(wrow, minlength=k).astype(np.int64)
    hdr = _uleb_size(r) + _sum_by(wrow, _uleb_size(skip) + _uleb_size(ln), k)
    lit = _sum_by(wrow, ln, k)
    sizes = np.where(fits, hdr + lit, PAGE_SIZE)
    ok = sizes < OVERFLOW
    # keep the pages that fit; number them 0..kc-1 in page order
    keep = ok[wrow]
    crow = np.cumsum(ok) - 1
    orow = wrow[keep]
    row, skip, ln, start = crow[orow], skip[keep], ln[keep], start[keep]
    r, hdr, lit = r[ok], hdr[ok], lit[ok]
    kc = len(r)
    # the lengths: page c's r at c + 2*ecr[c], run j's skip and len at row + 1 + 2j, + 2
    ecr = _excl_cumsum(r)
    nvals = kc + 2 * int(r.sum())
    vals = np.empty(nvals, dtype=np.int64)
    vals[np.arange(kc) + 2 * ecr] = r
    j = np.arange(len(row), dtype=np.int64)
    vals[row + 1 + 2 * j] = skip
    vals[row + 2 + 2 * j] = ln
    vsize = _uleb_size(vals)
    vpage = np.repeat(np.arange(kc), 1 + 2 * r)
    pos = _excl_cumsum(vsize) + _excl_cumsum(lit)[vpage]
    out = np.empty(int(hdr.sum() + lit.sum()), dtype=np.uint8)
    two = vals >= 128
    out[pos] = (vals & 0x7F) | (two.astype(np.int64) << 7)
    out[pos[two] + 1] = vals[two] >> 7
    # the new bytes, after each page's lengths
    src = _ranges(orow * PAGE_SIZE + start, ln)
    dst = np.arange(len(src), dtype=np.int64) + np.repeat(np.cumsum(hdr)[row], ln)
    out[dst] = cur.reshape(-1)[src]
    return ok, sizes[ok], out


def check_delta_lengths(lens: np.ndarray, what: str) -> str | None:
    """Destination: None when every delta length is 1..PAGE_SIZE, else what is wrong."""
    if np.any(lens == 0) or np.any(lens > PAGE_SIZE):
        return f"{what} is empty or longer than {PAGE_SIZE} bytes"
    return None


def parse(lens: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check deltas `data` (uint8, back to back, `lens` bytes each) and say where their new
    bytes go: (dst, src), flat offsets into the (k, PAGE_SIZE) pages and into `data`.
    ProtocolError on anything malformed."""
    k = len(lens)
    lens = lens.astype(np.int64)
    if np.any(lens < 1) or np.any(lens > PAGE_SIZE):
        raise ProtocolError("xbzrle delta of a bad length")
    if int(lens.sum()) != len(data):
        raise ProtocolError("xbzrle data does not match its lengths")
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    begin = _excl_cumsum(lens)
    stop = begin + lens
    last = len(data) - 1
    term = data < 0x80
    # r, a ULEB128 of 1 or 2 bytes at the start of each delta
    b0 = data[begin].astype(np.int64)
    one = b0 < 0x80
    b1 = data[np.minimum(begin + 1, last)].astype(np.int64)
    if np.any(~one & ((begin + 1 >= stop) | (b1 >= 0x80))):
        raise ProtocolError("xbzrle delta: truncated or overlong run count")
    r = np.where(one, b0, (b0 & 0x7F) | (b1 << 7))
    hstart = begin + np.where(one, 1, 2)
    if np.any(r > PAGE_SIZE):
        raise ProtocolError("xbzrle delta: more runs than a page has bytes")
    # its 2r lengths end at the 2r-th ULEB128 terminator from hstart: count terminators
    tcount = np.cumsum(term, dtype=np.int64)
    want = tcount[hstart - 1] + 2 * r
    hend = np.where(r == 0, hstart, np.searchsorted(tcount, want, side="left") + 1)
    if np.any(hend > stop):
        raise ProtocolError("xbzrle delta: truncated run lengths")
    # all the lengths' bytes, split into ULEB128 values at their terminators (each delta's
    # lengths end on a terminator, so no value straddles two deltas)
    hidx = _ranges(hstart, hend - hstart)
    hb = data[hidx].astype(np.int64)
    vend = np.flatnonzero(term[hidx])
    vstart = np.r_[0, vend[:-1] + 1] if len(vend) else vend
    if np.any(vend - vstart > 1):
        raise ProtocolError("xbzrle delta: a run length longer than 2 bytes")
    vals = np.where(vend > vstart, (hb[vstart] & 0x7F) | (hb[vend] << 7), hb[vstart])
    skip, ln = vals[0::2], vals[1::2]
    if np.any(ln < 1):
        raise ProtocolError("xbzrle delta: an empty run")
    # where each run ends in its page, and the new bytes each delta carries
    page = np.repeat(np.arange(k), r)
    step = skip + ln
    run_end = np.cumsum(step) - _excl_cumsum(_sum_by(page, step, k))[page]
    if np.any(run_end > PAGE_SIZE):
        raise ProtocolError("xbzrle delta: a run goes past the end of the page")
    lit = _sum_by(page, ln, k)
    if np.any(hend + lit != stop):
        raise ProtocolError("xbzrle delta: its new bytes do not match its run lengths")
    dst = _ranges(page * PAGE_SIZE + run_end - ln, ln)
    src = _ranges(hend[page] + _excl_cumsum(ln) - _excl_cumsum(lit)[page], ln)
    return dst, src


def _sum_by(group: np.ndarray, v: np.ndarray, k: int) -> np.ndarray:
    """Sum of `v` per group 0..k-1 (int64)."""
    return np.bincount(group, weights=v, minlength=k).astype(np.int64)


def decode(lens: np.ndarray, data: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Pages from deltas `data` against `base` ((k, PAGE_SIZE) uint8, C-contiguous, written
    in place only once every delta is found good); ProtocolError on a malformed delta."""
    dst, src = parse(lens, data)
    base.reshape(-1)[dst] = data[src]
    return base


def place_deltas(idx: np.ndarray, lens: np.ndarray, data: memoryview, placer: PagePlacer,
                 base: np.ndarray) -> None:
    """Store pages `idx` rebuilt from their deltas against `base` (see `decode`): nothing is
    stored unless every delta is good."""
    pages = decode(lens, np.frombuffer(data, np.uint8), base)
    if len(idx):
        placer.store(idx, pages)


@dataclass
class XbzrleCache:
    """Source: the previous copies of pages, at most `limit` bytes of them (whole pages),
    and the codec's counters. Slots are handed out in a ring: a new page takes the next slot,
    evicting its page (insertion order)."""

    limit: int
    hits: int = 0
    misses: int = 0
    overflows: int = 0
    bytes_saved: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.cap = max(0, self.limit // PAGE_SIZE)
        self.data = np.empty((min(self.cap, 1024), PAGE_SIZE), dtype=np.uint8)
        self.slot_page = np.full(len(self.data), _ABSENT, dtype=np.int64)
        self.page_slot = np.full(0, _ABSENT, dtype=np.int64)
        self.inserted = 0

    @property
    def cached_bytes(self) -> int:
        """Bytes of page copies held now."""
        return int(np.count_nonzero(self.slot_page >= 0)) * PAGE_SIZE

    def lookup(self, idx: np.ndarray) -> np.ndarray:
        """Per page: its slot, _ZERO (the destination holds zeros) or _ABSENT."""
        top = int(idx.max()) + 1
        if top > len(self.page_slot):
            grown = np.full(max(top, 2 * len(self.page_slot)), _ABSENT, dtype=np.int64)
            grown[: len(self.page_slot)] = self.page_slot
            self.page_slot = grown
        return self.page_slot[idx]

    def base(self, slots: np.ndarray) -> np.ndarray:
        """The cached copies for `slots` (zeros for _ZERO)."""
        out = np.zeros((len(slots), PAGE_SIZE), dtype=np.uint8)
        held = slots >= 0
        out[held] = self.data[slots[held]]
        return out

    def record(self, idx: np.ndarray, pages: np.ndarray, slots: np.ndarray,
               zero: np.ndarray) -> None:
        """The destination now holds `pages` for pages `idx` (whose slots were `slots`;
        `zero`: which are all zero)."""
        if zero.any():
            zs = slots[zero]
            freed = zs[zs >= 0]
            self.slot_page[freed] = _ABSENT
            self.page_slot[idx[zero]] = _ZERO
        have = ~zero & (slots >= 0)
        if have.any():
            self.data[slots[have]] = pages[have]
        new = ~zero & (slots < 0)
        if new.any():
            self._insert(idx[new], pages[new])

    def _insert(self, idx: np.ndarray, pages: np.ndarray) -> None:
        self.page_slot[idx] = _ABSENT  # a page marked zero that is not anymore
        if self.cap == 0:
            return
        if len(idx) > self.cap:
            idx, pages = idx[-self.cap :], pages[-self.cap :]
        m = len(idx)
        pos = (self.inserted + np.arange(m, dtype=np.int64)) % self.cap
        self.inserted = (self.inserted + m) % self.cap
        top = int(pos.max()) + 1
        if top > len(self.data):
            size = min(self.cap, max(top, 2 * len(self.data)))
            data = np.empty((size, PAGE_SIZE), dtype=np.uint8)
            data[: len(self.data)] = self.data
            slot_page = np.full(size, _ABSENT, dtype=np.int64)
            slot_page[: len(self.slot_page)] = self.slot_page
            self.data, self.slot_page = data, slot_page
        old = self.slot_page[pos]
        evict = old >= 0
        if evict.any():
            gone, where = old[evict], pos[evict]
            still = self.page_slot[gone] == where
            self.page_slot[gone[still]] = _ABSENT
        self.slot_page[pos] = idx
        self.page_slot[idx] = pos
        self.data[pos] = pages


class XbzrleCodec(Codec):
    id = 2
    name = "xbzrle"

    def enabled(self, opts: MigrationOptions) -> bool:
        return opts.xbzrle

    def new_state(self, opts: MigrationOptions | None, params: dict[str, Any] | None) -> Any:
        # The destination needs nothing: its RAM is the base of every delta.
        return XbzrleCache(opts.xbzrle_cache) if opts is not None else None

    def stats(self, state: Any) -> dict[str, int]:
        if not isinstance(state, XbzrleCache):
            return {}
        return {"hits": state.hits, "misses": state.misses, "overflows": state.overflows,
                "bytes_saved": state.bytes_saved, "cache_bytes": state.cached_bytes}

    def claim(self, idx: np.ndarray, pages: np.ndarray, todo: np.ndarray, state: Any) -> Claim:
        if not isinstance(state, XbzrleCache):
            return Claim(np.zeros(len(idx), dtype=bool), np.zeros(0, dtype=np.uint32))
        with state.lock:
            slots = state.lookup(idx)
            nonzero = nonzero_in(pages)
            todo = todo & nonzero  # zero pages are the zero codec's (no data at all)
            cand = todo & (slots != _ABSENT)
            state.misses += int(np.count_nonzero(todo)) - int(np.count_nonzero(cand))
            mask = np.zeros(len(idx), dtype=bool)
            lens = np.zeros(0, dtype=np.uint32)
            out: list[bytes | memoryview] = []
            rows = np.flatnonzero(cand)
            if len(rows):
                ok, sizes, data = encode(pages[rows], state.base(slots[rows]))
                hits = int(np.count_nonzero(ok))
                state.overflows += len(rows) - hits
                mask[rows[ok]] = True
                state.hits += hits
                state.bytes_saved += hits * PAGE_SIZE - int(sizes.sum())
                lens = sizes.astype(np.uint32)
                if hits:
                    out = [data.data]
            # Whatever codec sends them, every page of the batch arrives as it is here.
            state.record(idx, pages, slots, ~nonzero)
        return Claim(mask, lens, out)

    def check(self, lens: np.ndarray) -> str | None:
        return check_delta_lengths(lens, "an xbzrle delta")

    def place(self, idx: np.ndarray, lens: np.ndarray, data: memoryview, placer: PagePlacer,
              state: Any) -> None:
        pages = placer.current(idx)
        if not (pages.dtype == np.uint8 and pages.flags.c_contiguous and pages.flags.writeable):
            pages = np.array(pages, dtype=np.uint8)
        place_deltas(idx, lens, data, placer, pages)
