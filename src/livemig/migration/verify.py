"""`--verify-memory`: a keyed BLAKE3 hash of every page, compared at the destination.

VERIFY payload: 32-byte key, u32 digest size d (16), u32 reserved, u64 first page, then d bytes
per page from that page on (a machine larger than one record holds sends several).
The key is fresh per migration, so a guest cannot craft pages whose digests collide.
All-zero pages share one digest, computed once.
"""

from __future__ import annotations

import os
import struct

import blake3
import numpy as np

from livemig.contract import PAGE_SIZE
from livemig.migration.errors import ProtocolError
from livemig.migration.scan import nonzero_pages

DIGEST_SIZE = 16
KEY_SIZE = 32
_HEAD = struct.Struct("<32sIIQ")
PAGES_PER_RECORD = (8 << 20) // DIGEST_SIZE


def new_key() -> bytes:
    return os.urandom(KEY_SIZE)


def page_digests(
    ram_pages: np.ndarray, key: bytes, candidates: np.ndarray | None = None
) -> np.ndarray:
    """(npages, DIGEST_SIZE) uint8 array: keyed BLAKE3 of every page. Pages outside
    `candidates` (bool per page, see scan.populated) are known to be zero."""
    n = len(ram_pages)
    out = np.empty((n, DIGEST_SIZE), dtype=np.uint8)
    if candidates is None:
        candidates = np.ones(n, dtype=bool)
    nonzero = nonzero_pages(ram_pages, candidates)
    out[:] = np.frombuffer(
        blake3.blake3(bytes(PAGE_SIZE), key=key).digest(DIGEST_SIZE), np.uint8
    )
    flat = ram_pages.reshape(-1).data
    for i in nonzero.tolist():
        d = blake3.blake3(flat[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], key=key).digest(DIGEST_SIZE)
        out[i] = np.frombuffer(d, np.uint8)
    return out


def encode(key: bytes, first: int, digests: np.ndarray) -> list[bytes | memoryview]:
    """Buffers of a VERIFY payload for pages first .. first + len(digests)."""
    body = np.ascontiguousarray(digests).data.cast("B")
    return [_HEAD.pack(key, DIGEST_SIZE, 0, first), body]


class VerifyTable:
    """Destination side: the digests received so far, and the check at switch-over."""

    def __init__(self, npages: int) -> None:
        self.key: bytes | None = None
        self.digests = np.zeros((npages, DIGEST_SIZE), dtype=np.uint8)
        self.covered = np.zeros(npages, dtype=bool)

    def add(self, payload: memoryview) -> None:
        """Take one VERIFY record; ProtocolError if it does not fit."""
        if len(payload) < _HEAD.size:
            raise ProtocolError("VERIFY record too short")
        key, d, reserved, first = _HEAD.unpack_from(payload)
        body = len(payload) - _HEAD.size
        n = body // DIGEST_SIZE
        if d != DIGEST_SIZE or reserved or body % d or first + n > len(self.covered) or not n:
            raise ProtocolError(f"VERIFY record does not fit (digest {d}, first {first}, n {n})")
        if self.key is not None and key != self.key:
            raise ProtocolError("VERIFY records disagree on the key")
        self.key = key
        arr = np.frombuffer(payload, np.uint8, body, _HEAD.size).reshape(n, d)
        self.digests[first : first + n] = arr
        self.covered[first : first + n] = True

    def check(self, ram_pages: np.ndarray, candidates: np.ndarray | None = None,
              exclude: np.ndarray | None = None) -> str | None:
        """None when every page matches, else a message naming the damage. Pages in
        `exclude` (bool per page) are neither read nor compared (post-copy checks them as
        they arrive, `check_rows`)."""
        if self.key is None or not self.covered.all():
            return "memory verification incomplete: digests missing for some pages"
        if exclude is not None:
            base = np.ones(len(ram_pages), dtype=bool) if candidates is None else candidates
            candidates = base & ~exclude
        got = page_digests(ram_pages, self.key, candidates)
        differ = np.any(got != self.digests, axis=1)
        if exclude is not None:
            differ &= ~exclude
        return _damage(np.flatnonzero(differ))

    def check_rows(self, idx: np.ndarray, rows: np.ndarray | None) -> str | None:
        """Pages `idx` about to be installed with contents `rows` ((n, PAGE_SIZE); None: all
        zero): None when each matches its digest, else what is wrong."""
        if self.key is None or not self.covered.all():
            return "memory verification incomplete: digests missing for some pages"
        zero = blake3.blake3(bytes(PAGE_SIZE), key=self.key).digest(DIGEST_SIZE)
        bad = []
        for i, page in enumerate(idx.tolist()):
            d = zero if rows is None else blake3.blake3(
                rows[i].data, key=self.key).digest(DIGEST_SIZE)
            if d != self.digests[page].tobytes():
                bad.append(page)
        return _damage(np.asarray(bad, dtype=np.int64))


def _damage(bad: np.ndarray) -> str | None:
    if len(bad) == 0:
        return None
    return (f"memory verification failed: {len(bad)} page(s) differ from the source "
            f"(first at page {int(bad[0])}, guest address {int(bad[0]) * PAGE_SIZE:#x})")
