"""Strategies by `--mode` (docs/engine.md: adding one is a module here and a line below)."""

from __future__ import annotations

from livemig.migration.options import Mode
from livemig.migration.strategies.base import Strategy
from livemig.migration.strategies.handover import Handover
from livemig.migration.strategies.hybrid import Hybrid
from livemig.migration.strategies.postcopy import PostCopy
from livemig.migration.strategies.precopy import PreCopy
from livemig.migration.strategies.stopcopy import StopCopy
from livemig.migration.strategies.tlm import TemplateAware

REGISTRY: dict[Mode, type[Strategy]] = {Mode.PRECOPY: PreCopy, Mode.STOP_COPY: StopCopy,
                                        Mode.POSTCOPY: PostCopy, Mode.HYBRID: Hybrid,
                                        Mode.HANDOVER: Handover, Mode.TLM: TemplateAware}


def for_mode(mode: Mode) -> Strategy:
    """A fresh strategy object for one migration."""
    return REGISTRY[mode]()


__all__ = ["REGISTRY", "Strategy", "for_mode"]
