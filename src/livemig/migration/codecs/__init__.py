"""Page codecs and their registry (docs/engine.md: adding a codec is one module here).

Codecs are tried in `REGISTRY` order on the source (cheapest test first, `raw` last: it takes
whatever is left); on the wire each is known by its id, in the hello by its name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from livemig.migration.codecs.base import Claim, Codec, PagePlacer, as_pages
from livemig.migration.codecs.compress import Lz4Codec, ZstdCodec
from livemig.migration.codecs.dedup import DedupCodec
from livemig.migration.codecs.raw import RawCodec
from livemig.migration.codecs.sparse import SparseCodec
from livemig.migration.codecs.xbzrle import XbzrleCodec
from livemig.migration.codecs.zero import ZeroCodec
from livemig.migration.errors import ProtocolError
from livemig.migration.options import MigrationOptions

REGISTRY: list[Codec] = [XbzrleCodec(), DedupCodec(), ZeroCodec(), SparseCodec(), ZstdCodec(),
                         Lz4Codec(), RawCodec()]
BY_NAME = {c.name: c for c in REGISTRY}
BY_ID = {c.id: c for c in REGISTRY}
SUPPORTED = [c.name for c in REGISTRY]
REQUIRED = ("zero", "raw")  # every session has these; others are negotiated


def offered(opts: MigrationOptions) -> list[str]:
    """The codecs a source offers for a migration with `opts`."""
    return [c.name for c in REGISTRY if c.enabled(opts)]


class CodecSet:
    """The codecs a session negotiated, with each one's per-session state.

    The source makes it with its options (`opts`); the destination without, and then calls
    `configure` with what CONFIG carried under `codecs`.
    """

    def __init__(self, names: Iterable[str], opts: MigrationOptions | None = None) -> None:
        chosen = set(names)
        self.codecs = [c for c in REGISTRY if c.name in chosen]
        self.by_id = {c.id: c for c in self.codecs}
        self.state: dict[int, Any] = {c.id: c.new_state(opts, None) for c in self.codecs}

    def params(self) -> dict[str, dict[str, Any]]:
        """Source: each codec's parameters for the destination (CONFIG `codecs`)."""
        out = {}
        for c in self.codecs:
            p = c.params(self.state[c.id])
            if p is not None:
                out[c.name] = p
        return out

    def configure(self, params: object) -> None:
        """Destination: per-codec state from CONFIG's `codecs` map; ProtocolError if bad."""
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ProtocolError("CONFIG record: codecs is not a map")
        for c in self.codecs:
            p = params.get(c.name)
            if p is not None and not isinstance(p, dict):
                raise ProtocolError(f"CONFIG record: parameters of codec {c.name} are not a map")
            self.state[c.id] = c.new_state(None, p)

    def stats(self) -> dict[str, dict[str, int]]:
        """Codec-specific counters, by codec name (only codecs that keep any)."""
        return {c.name: st for c in self.codecs if (st := c.stats(self.state[c.id]))}

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.codecs]

    def missing(self) -> list[str]:
        """Required codecs the session lacks."""
        return [n for n in REQUIRED if n not in self.names]


__all__ = ["BY_ID", "BY_NAME", "Claim", "Codec", "CodecSet", "PagePlacer", "REGISTRY",
           "SUPPORTED", "as_pages", "offered"]
