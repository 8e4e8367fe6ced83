"""Page codecs and their registry (docs/engine.md: adding a codec is one module here).

Codecs are tried in `REGISTRY` order on the source (cheapest test first, `raw` last: it takes
whatever is left); on the wire each is known by its id, in the hello by its name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from livemig.migration.codecs.base import Claim, Codec, PagePlacer, as_pages
from livemig.migration.codecs.raw import RawCodec
from livemig.migration.codecs.zero import ZeroCodec

REGISTRY: list[Codec] = [ZeroCodec(), RawCodec()]
BY_NAME = {c.name: c for c in REGISTRY}
BY_ID = {c.id: c for c in REGISTRY}
SUPPORTED = [c.name for c in REGISTRY]
REQUIRED = ("zero", "raw")  # every session has these; others are negotiated


class CodecSet:
    """The codecs a session negotiated, with each one's per-session state."""

    def __init__(self, names: Iterable[str]) -> None:
        chosen = set(names)
        self.codecs = [c for c in REGISTRY if c.name in chosen]
        self.by_id = {c.id: c for c in self.codecs}
        self.state: dict[int, Any] = {c.id: c.new_state() for c in self.codecs}

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.codecs]

    def missing(self) -> list[str]:
        """Required codecs the session lacks."""
        return [n for n in REQUIRED if n not in self.names]


__all__ = ["BY_ID", "BY_NAME", "Claim", "Codec", "CodecSet", "PagePlacer", "REGISTRY",
           "SUPPORTED", "as_pages"]
