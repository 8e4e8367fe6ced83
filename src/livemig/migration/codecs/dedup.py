"""The `dedup` codec (id 5, `--dedup`): a page whose content the destination already holds at
another page goes as a reference to that page.

Encoded page: u64 page number of the referenced page, then the 32-byte keyed BLAKE3 digest
of the content (40 bytes instead of 4096). The key is 32 random bytes made per migration on
the source and sent to the destination in CONFIG (`codecs: {"dedup": {"key": ...}}`): a guest
does not know it, so it cannot make two different pages with one digest. The destination
hashes what the referenced page holds now with that key and copies it only when the digest
is the one sent; otherwise the batch is refused (ProtocolError naming both pages) before any
of its references is written.

Source bookkeeping: `digest -> page` for pages whose content at the destination is known
(the first page seen with each content, "targets"), and `page -> digest` for the same pages.
Every page of a batch is about to be overwritten at the destination, so at the start of each
`claim` the batch's pages stop being targets, before any lookup: a page that changed is never
referenced with its old content, and a reference never points into its own batch (the
destination places a batch's codecs in id order, so a target in the same batch could be
overwritten or not yet written). The batch's new non-zero contents become targets at the end
of `claim`: references only ever point at pages of earlier batches, which the destination has
placed before this one (one channel keeps order; page streams place batches in order too).

The codec must see every batch, also one whose pages earlier codecs took entirely (a page
zeroed, or sent as a delta, is no longer a target): the encoder asks every codec about every
batch (`pages.BatchEncoder`). It leaves zero pages to `zero` and does not hash pages an
earlier codec took. Only non-zero pages are hashed, one BLAKE3 call per page (C); the table
holds one entry per distinct content sent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np

from livemig.contract import PAGE_SIZE
from livemig.migration.codecs.base import Claim, Codec, PagePlacer
from livemig.migration.errors import ProtocolError
from livemig.migration.options import MigrationOptions
from livemig.migration.scan import nonzero_in

KEY_SIZE = 32  # BLAKE3's key
DIGEST_SIZE = 32  # the full BLAKE3 digest
REF_SIZE = 8 + DIGEST_SIZE  # encoded page: u64 referenced page, digest
_MAX_PAGE = 1 << 62  # no RAM has this many pages; keeps page numbers clear of int64 overflow


@dataclass
class SourceState:
    key: bytes
    digest_page: dict[bytes, int] = field(default_factory=dict)  # content -> a page holding it
    page_digest: dict[int, bytes] = field(default_factory=dict)  # the same entries, by page
    references: int = 0


@dataclass
class DestState:
    key: bytes | None  # None only until CONFIG: a reference before it is refused


class DedupCodec(Codec):
    id = 5
    name = "dedup"

    def enabled(self, opts: MigrationOptions) -> bool:
        return opts.dedup

    def new_state(self, opts: MigrationOptions | None,
                  params: dict[str, Any] | None) -> SourceState | DestState:
        if opts is not None:
            return SourceState(os.urandom(KEY_SIZE))
        if params is None:  # a session before CONFIG (or one whose CONFIG named no key)
            return DestState(None)
        key = params.get("key")
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            got = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
            raise ProtocolError(f"CONFIG record: dedup key must be {KEY_SIZE} bytes, got {got}")
        return DestState(key)

    def params(self, state: Any) -> dict[str, Any] | None:
        assert isinstance(state, SourceState)
        return {"key": state.key}

    def stats(self, state: Any) -> dict[str, int]:
        if not isinstance(state, SourceState):
            return {}
        return {"references": state.references,
                "bytes_saved": state.references * (PAGE_SIZE - REF_SIZE),
                "targets": len(state.digest_page)}

    def claim(self, idx: np.ndarray, pages: np.ndarray, todo: np.ndarray, state: Any) -> Claim:
        st: SourceState = state
        by_digest, by_page = st.digest_page, st.page_digest
        if by_page:  # these pages are overwritten by this batch: no longer targets
            for p in idx.tolist():
                old = by_page.pop(p, None)
                if old is not None:
                    del by_digest[old]
        mask = np.zeros(len(idx), dtype=bool)
        cand = np.flatnonzero(todo & nonzero_in(pages))
        if not len(cand):
            return Claim(mask, np.zeros(0, dtype=np.uint32))
        flat = np.ascontiguousarray(pages).reshape(-1).data
        key = st.key
        page_numbers = idx.tolist()
        hits: list[int] = []  # referenced pages
        hit_digests: list[bytes] = []
        new: list[tuple[int, bytes]] = []  # contents the destination does not hold yet
        for i in cand.tolist():
            d = blake3.blake3(flat[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], key=key).digest()
            t = by_digest.get(d)
            if t is None:
                new.append((page_numbers[i], d))
            else:
                mask[i] = True
                hits.append(t)
                hit_digests.append(d)
        # This batch's contents become targets only now: referenced from the next batch on.
        for p, d in new:
            if d not in by_digest:  # the first page with a content stays its target
                by_digest[d] = p
                by_page[p] = d
        k = len(hits)
        if not k:
            return Claim(mask, np.zeros(0, dtype=np.uint32))
        out = np.empty((k, REF_SIZE), dtype=np.uint8)
        out[:, :8] = np.array(hits, dtype="<u8").view(np.uint8).reshape(k, 8)
        out[:, 8:] = np.frombuffer(b"".join(hit_digests), np.uint8).reshape(k, DIGEST_SIZE)
        st.references += k
        return Claim(mask, np.full(k, REF_SIZE, dtype=np.uint32), [out.data.cast("B")])

    def check(self, lens: np.ndarray) -> str | None:
        return None if np.all(lens == REF_SIZE) else f"a dedup reference is not {REF_SIZE} bytes"

    def place(self, idx: np.ndarray, lens: np.ndarray, data: memoryview, placer: PagePlacer,
              state: Any) -> None:
        st: DestState = state
        if st.key is None:
            raise ProtocolError("PAGES record has dedup references but CONFIG gave no dedup key")
        if len(data) != len(idx) * REF_SIZE:
            raise ProtocolError("PAGES record: dedup references do not fit their data")
        n = len(idx)
        if not n:
            return
        refs = np.frombuffer(data, np.uint8, n * REF_SIZE).reshape(n, REF_SIZE)
        wanted = refs[:, :8].copy().view("<u8").reshape(n)
        if int(wanted.max()) >= _MAX_PAGE:
            raise ProtocolError(f"PAGES record: dedup reference to page {int(wanted.max())}")
        targets, which = np.unique(wanted.astype(np.int64), return_inverse=True)
        try:
            held = np.ascontiguousarray(placer.current(targets))
        except IndexError:
            raise ProtocolError("PAGES record: a dedup reference names a page outside RAM "
                                f"(page {int(targets[-1])})") from None
        flat = held.reshape(-1).data
        key = st.key
        have = np.frombuffer(b"".join(
            blake3.blake3(flat[j * PAGE_SIZE : (j + 1) * PAGE_SIZE], key=key).digest()
            for j in range(len(targets))), np.uint8).reshape(-1, DIGEST_SIZE)
        bad = np.flatnonzero(np.any(have[which] != refs[:, 8:], axis=1))
        if len(bad):
            k = int(bad[0])
            raise ProtocolError(
                f"PAGES record: dedup reference of page {int(idx[k])} to page "
                f"{int(wanted[k])} does not match what that page holds (digest differs"
                f"{f'; {len(bad)} references refused' if len(bad) > 1 else ''})")
        placer.store(idx, held[which])
