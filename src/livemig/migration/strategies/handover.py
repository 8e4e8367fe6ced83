"""Same-host handover: the destination is a livemig process on this host, and the machine's
RAM goes to it as file descriptors (SCM_RIGHTS with CONFIG), not as bytes. Nothing is copied
live; with the guest paused only CPU and device state go, then the usual READY / COMMIT /
RUNNING handshake decides which process runs the machine. Both map the same memfd, so RAM is
never freed by the source when it closes (GuestMemory.hand_over).

A clone's RAM is a private mapping of its template, not a memfd: the template's memory file
goes instead (its descriptor, and its path, which the destination checks is that file), the
destination maps it copy-on-write, and the clone's deltas (the pages it wrote) are the only
pages copied, in the last round. Nothing of the template is copied."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from livemig.migration import hello, templates
from livemig.migration.errors import MigrationError
from livemig.migration.strategies.base import Strategy

if TYPE_CHECKING:
    from livemig.migration.source import Source

MEMORY_HANDOVER = "handover"  # CONFIG "memory" kind: the RAM memfds came with this record
MEMORY_HANDOVER_TEMPLATE = "handover-template"  # the clone's template file came with it


class Handover(Strategy):
    name = "handover"

    def __init__(self) -> None:
        self.clone = False  # RAM is a template mapping: the deltas go in the last round
        self.fd: int | None = None  # the template file, open until CONFIG has taken it

    def configure(self, src: Source) -> tuple[dict[str, Any], list[int]]:
        if src.session is None or hello.FEATURE_HANDOVER not in src.session.features:
            raise MigrationError("the destination does not take a same-host handover")
        if src.main.kind != "unix":
            raise MigrationError("a handover needs a livemig on this host: give --to unix:PATH")
        fds = src.m.memory.hand_over()
        if fds:
            src.stats.event(f"handover-fds:{len(fds)}")
            return {"memory": {"kind": MEMORY_HANDOVER, "fds": len(fds)}}, fds
        t = templates.of_machine(src.m)
        if t is None:
            raise MigrationError("this machine's RAM cannot be handed over (no memfd)")
        self.clone = True
        self.fd = os.open(t.memory_path, os.O_RDONLY | os.O_CLOEXEC)
        src.stats.event("handover-template")
        return ({"memory": {"kind": MEMORY_HANDOVER_TEMPLATE, "fds": 1, "id": t.content_id,
                            "path": str(t.memory_path)}}, [self.fd])

    def live_copy(self, src: Source) -> None:
        if self.fd is not None:  # CONFIG went with it: the destination holds its own copy
            os.close(self.fd)
            self.fd = None

    def final_pages(self, src: Source) -> np.ndarray | None:
        if not self.clone:
            return np.zeros(0, dtype=np.int64)
        deltas = src.m.memory.template_deltas()  # the guest is paused: this is all of them
        if deltas is None:
            raise MigrationError("the clone's RAM no longer maps its template")
        idx = np.flatnonzero(deltas)
        src.stats.event(f"handover-deltas:{len(idx)}")
        return idx
