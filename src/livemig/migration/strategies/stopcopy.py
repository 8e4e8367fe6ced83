"""Stop-and-copy: pause first, then send every page that holds data in one round."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from livemig.migration.strategies.base import Strategy

if TYPE_CHECKING:
    from livemig.migration.source import Source


class StopCopy(Strategy):
    name = "stop-copy"

    def final_pages(self, src: Source) -> np.ndarray | None:
        return None
