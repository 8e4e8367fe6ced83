"""Same-host handover: the destination is a livemig process on this host, and the machine's
RAM goes to it as file descriptors (SCM_RIGHTS with CONFIG), not as bytes. Nothing is copied
live; with the guest paused only CPU and device state go, then the usual READY / COMMIT /
RUNNING handshake decides which process runs the machine. Both map the same memfd, so RAM is
never freed by the source when it closes (GuestMemory.hand_over)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from livemig.migration import hello
from livemig.migration.errors import MigrationError
from livemig.migration.strategies.base import Strategy

if TYPE_CHECKING:
    from livemig.migration.source import Source

MEMORY_HANDOVER = "handover"  # CONFIG "memory" kind: the RAM memfds came with this record


class Handover(Strategy):
    name = "handover"

    def configure(self, src: Source) -> tuple[dict[str, Any], list[int]]:
        if src.session is None or hello.FEATURE_HANDOVER not in src.session.features:
            raise MigrationError("the destination does not take a same-host handover")
        if src.main.kind != "unix":
            raise MigrationError("a handover needs a livemig on this host: give --to unix:PATH")
        fds = src.m.memory.hand_over()
        if not fds:
            raise MigrationError("this machine's RAM cannot be handed over (no memfd)")
        src.stats.event(f"handover-fds:{len(fds)}")
        return {"memory": {"kind": MEMORY_HANDOVER, "fds": len(fds)}}, fds

    def final_pages(self, src: Source) -> np.ndarray | None:
        return np.zeros(0, dtype=np.int64)
