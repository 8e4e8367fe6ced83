"""The strategy contract: the phases one driver (source.Source) runs for a migration.

    offer         additions to the hello (TLM: the template ids the machine was cloned from)
    configure     extra CONFIG fields (how the destination makes RAM), fds sent with CONFIG
    live_copy     while the guest runs (nothing for stop-and-copy; rounds for pre-copy)
    final_pages   with the guest paused: which pages the last round sends
    state_sent    STATE is on its way: work that must be done before COMMIT but need not
                  delay STATE (post-copy sets up its page server here)
    after_commit  once the destination runs the guest (post-copy will push pages here)

The driver owns everything common: the hello, CONFIG, pausing, VERIFY, STATE, the READY /
COMMIT / RUNNING handshake and failure handling. A strategy only decides what to copy when.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from livemig.migration.hello import Hello
    from livemig.migration.source import Source


class Strategy(ABC):
    """One way of moving a machine; `name` is its `--mode`."""

    name: str
    postcopy = False  # runs the guest at the destination before all pages are there

    def offer(self, src: Source, proposal: Hello) -> None:  # noqa: B027 - most: nothing
        """Before the hello: add to what the source proposes (TLM names its template)."""

    def configure(self, src: Source) -> tuple[dict[str, Any], list[int]]:
        """Before CONFIG goes: fields to add to it, and file descriptors to send with it."""
        return {}, []

    def live_copy(self, src: Source) -> None:  # noqa: B027 - stop-and-copy has none
        """Copy while the guest runs; may return early for the switch-over."""

    @abstractmethod
    def final_pages(self, src: Source) -> np.ndarray | None:
        """Called with the guest paused: the pages of the last round (None: every page
        that holds data)."""

    def state_sent(self, src: Source) -> None:  # noqa: B027 - most strategies: nothing
        """STATE has gone; the destination is loading it (the guest is paused here)."""

    def owed_pages(self, src: Source) -> np.ndarray | None:
        """Post-copy: the pages (bool per page) the destination must fetch after COMMIT; they
        go in STATE. None for strategies that send every page before it."""
        return None

    def state_fields(self, src: Source) -> dict[str, Any]:
        """Fields to add to STATE (post-copy: how page requests travel)."""
        return {}

    def after_commit(self, src: Source) -> None:  # noqa: B027 - most strategies: none
        """Called once the destination confirmed RUNNING."""
