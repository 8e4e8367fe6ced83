"""The `raw` codec (id 1): the page's 4096 bytes as they are."""

from __future__ import annotations

from typing import Any

import numpy as np

from livemig.contract import PAGE_SIZE
from livemig.migration.codecs.base import Claim, Codec, PagePlacer, as_pages


class RawCodec(Codec):
    id = 1
    name = "raw"

    def claim(self, idx: np.ndarray, pages: np.ndarray, todo: np.ndarray, state: Any) -> Claim:
        n = int(np.count_nonzero(todo))
        data = pages if n == len(pages) else pages[todo]
        lens = np.full(n, PAGE_SIZE, dtype=np.uint32)
        return Claim(todo.copy(), lens, [data.data.cast("B")] if n else [])

    def check(self, lens: np.ndarray) -> str | None:
        return None if np.all(lens == PAGE_SIZE) else f"a raw page is not {PAGE_SIZE} bytes"

    def place(self, idx: np.ndarray, lens: np.ndarray, data: memoryview, placer: PagePlacer,
              state: Any) -> None:
        placer.store(idx, as_pages(data))
