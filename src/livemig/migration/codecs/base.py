"""The codec contract: how a page is encoded on the source and placed at the destination.

A codec works on a whole batch at once (numpy), never page by page in Python. On the source
it claims, among the pages still unclaimed, those it can encode, and returns their encoded
lengths and bytes; on the destination it checks the lengths of its pages and places them
through a `PagePlacer`, the hook that decides how a page lands in guest RAM (a store into
the mapping here; UFFDIO_COPY for a post-copy destination). Per-session state (a delta
cache, a dedup table) comes from `new_state`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from livemig.contract import PAGE_SIZE
from livemig.migration.options import MigrationOptions


class PagePlacer(Protocol):
    """Where decoded pages go at the destination."""

    def zero(self, idx: np.ndarray) -> None:
        """Pages `idx` are all zero."""

    def store(self, idx: np.ndarray, data: np.ndarray) -> None:
        """Pages `idx` get `data` ((n, PAGE_SIZE) uint8, one row per page)."""

    def current(self, idx: np.ndarray) -> np.ndarray:
        """A copy of what pages `idx` hold now ((n, PAGE_SIZE)): the base of a delta, the
        target of a reference."""


@dataclass
class Claim:
    """What a codec encodes of a batch: a mask over the batch, lengths and data in order."""

    mask: np.ndarray
    lens: np.ndarray
    data: list[bytes | memoryview] = field(default_factory=list)


class Codec(ABC):
    """One page encoding; `id` is its number on the wire, `name` what the hello negotiates."""

    id: int
    name: str

    def enabled(self, opts: MigrationOptions) -> bool:
        """Source: whether to offer this codec for a migration with `opts` (the required
        codecs always; the others when the user asked for them)."""
        return True

    def new_state(self, opts: MigrationOptions | None, params: dict[str, Any] | None) -> Any:
        """Per-session state (None when it keeps none). The source passes its options; the
        destination passes what the source's `params` sent in CONFIG."""
        return None

    def params(self, state: Any) -> dict[str, Any] | None:
        """Source: what the destination's state needs (sent in CONFIG under `codecs`)."""
        return None

    def stats(self, state: Any) -> dict[str, int]:
        """Codec-specific counters for MigrationStats (cache hits, misses, ...)."""
        return {}

    @abstractmethod
    def claim(self, idx: np.ndarray, pages: np.ndarray, todo: np.ndarray, state: Any) -> Claim:
        """Source: encode those of `pages` ((n, PAGE_SIZE), a private copy or frozen RAM; page
        numbers `idx`) still `todo` (bool per page) that this codec takes."""

    @abstractmethod
    def check(self, lens: np.ndarray) -> str | None:
        """Destination: None when `lens` (this codec's pages of a batch) can be right, else
        what is wrong."""

    @abstractmethod
    def place(self, idx: np.ndarray, lens: np.ndarray, data: memoryview, placer: PagePlacer,
              state: Any) -> None:
        """Destination: decode pages `idx` from `data` (their bytes, back to back) and place
        them."""


def as_pages(data: memoryview) -> np.ndarray:
    """A (n, PAGE_SIZE) uint8 view of back-to-back raw pages."""
    return np.frombuffer(data, np.uint8).reshape(-1, PAGE_SIZE)
