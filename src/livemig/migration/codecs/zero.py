"""The `zero` codec (id 0): an all-zero page, no data."""

from __future__ import annotations

from typing import Any

import numpy as np

from livemig.migration.codecs.base import Claim, Codec, PagePlacer
from livemig.migration.scan import nonzero_in


class ZeroCodec(Codec):
    id = 0
    name = "zero"

    def claim(self, idx: np.ndarray, pages: np.ndarray, todo: np.ndarray, state: Any) -> Claim:
        mask = todo & ~nonzero_in(pages)
        return Claim(mask, np.zeros(int(np.count_nonzero(mask)), dtype=np.uint32))

    def check(self, lens: np.ndarray) -> str | None:
        return None if not np.any(lens) else "a zero page carries data"

    def place(self, idx: np.ndarray, lens: np.ndarray, data: memoryview, placer: PagePlacer,
              state: Any) -> None:
        placer.zero(idx)
