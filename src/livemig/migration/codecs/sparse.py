"""The `sparse` codec (id 6): a page that is mostly zeros, as its runs of non-zero bytes.

The encoding is XBZRLE's (codecs/xbzrle.py: run count, (skip, len) pairs as ULEB128s, then the
new bytes) taken against an all-zero page instead of a previous copy, so it needs no cache and
no knowledge of what the destination holds: the destination decodes onto a zero page and
stores the result, whatever the page held before. It pays for pages that were never sent
before or fell out of the XBZRLE cache and still hold little data (page tables, counters,
partly used buffers). Offered with `--xbzrle`.

Source: a cheap test first (16 of a page's 512 words, one every 256 bytes: a page with more
than 4 of them non-zero is left alone), then the delta of the candidates; one of
`xbzrle.OVERFLOW` bytes or more is not sent (the page goes with a later codec).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from livemig.contract import PAGE_SIZE
from livemig.migration.codecs.base import Claim, Codec, PagePlacer
from livemig.migration.codecs.xbzrle import check_delta_lengths, encode, place_deltas
from livemig.migration.options import MigrationOptions

SAMPLE_EVERY = 32  # words: a page is sampled at 16 words
SAMPLE_MAX = 4  # more non-zero sampled words than this: too dense to try


class SparseCodec(Codec):
    id = 6
    name = "sparse"

    def enabled(self, opts: MigrationOptions) -> bool:
        return opts.xbzrle

    def claim(self, idx: np.ndarray, pages: np.ndarray, todo: np.ndarray, state: Any) -> Claim:
        words = pages.view(np.uint64)
        sampled = np.count_nonzero(words[:, ::SAMPLE_EVERY], axis=1)
        rows = np.flatnonzero(todo & (sampled <= SAMPLE_MAX))
        mask = np.zeros(len(idx), dtype=bool)
        if not len(rows):
            return Claim(mask, np.zeros(0, dtype=np.uint32))
        ok, sizes, data = encode(pages if len(rows) == len(idx) else pages[rows], None)
        mask[rows[ok]] = True
        # a zero page left here (no earlier zero codec) has an empty delta: never sent so
        if not np.all(sizes > 0):
            raise ValueError("sparse: a zero page reached it (zero must come first)")
        return Claim(mask, sizes.astype(np.uint32), [data.data] if ok.any() else [])

    def check(self, lens: np.ndarray) -> str | None:
        return check_delta_lengths(lens, "a sparse page")

    def place(self, idx: np.ndarray, lens: np.ndarray, data: memoryview, placer: PagePlacer,
              state: Any) -> None:
        place_deltas(idx, lens, data, placer, np.zeros((len(idx), PAGE_SIZE), dtype=np.uint8))
