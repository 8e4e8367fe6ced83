"""Post-copy: pause at once, move CPU and device state, run the guest at the destination; its
memory follows, pushed in order and pulled by faults (pageserver.py, postcopy_dest.py).

The STATE record carries which pages the destination must not assume zero ("owed"); nothing
else is sent before the switch. After COMMIT the source keeps every page until COMPLETE; a
broken link pauses both sides (the destination's vCPUs wait on missing pages) until
`migrate-recover` reconnects, and the destination's MISSING list says what is left.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from livemig.migration import faultpath, handoff, records, scan
from livemig.migration.errors import ConnectionLost, Timeout
from livemig.migration.pageserver import PageServer
from livemig.migration.stats import FaultStats
from livemig.migration.strategies.base import Strategy
from livemig.migration.wire import Record, RecordType

if TYPE_CHECKING:
    from livemig.migration.source import Source

COMPLETE_WAIT = 60.0  # seconds from the last push to COMPLETE before the link counts as lost


class PostcopyTail(ABC):
    """What post-copy and hybrid share: the owed pages, and the page server after COMMIT."""

    def __init__(self) -> None:
        self.owed: np.ndarray | None = None  # bool per page, from the pause on
        self.server: PageServer | None = None
        self.native = False  # page requests on the urgent connection, served in C
        self._complete: list[Record] = []
        self._done = threading.Event()  # COMPLETE came

    def final_pages(self, src: Source) -> np.ndarray | None:
        """The last round sends nothing: it goes out at once, and the destination handles it
        while this side saves the machine's state and finds what is owed (`owed_pages`)."""
        return np.zeros(0, dtype=np.int64)

    def owed_pages(self, src: Source) -> np.ndarray | None:
        """With the guest paused, right before STATE: the pages owed, served after COMMIT."""
        if self.owed is None:
            self.owed = self.find_owed(src)
            src.step("owed-bitmap")
        return self.owed

    @abstractmethod
    def find_owed(self, src: Source) -> np.ndarray:
        """Bool per page: what the destination must fetch after COMMIT (guest paused)."""

    def state_fields(self, src: Source) -> dict[str, Any]:
        """Post-copy: whether faults are served by the C loops (both sides built them, plain
        sockets, no --verify-memory digest to check before a page goes in)."""
        if self.owed is None:
            return {}
        assert src.session is not None
        self.native = faultpath.usable(src.session.features, src.opts.verify_memory, src.main,
                                       src.session.urgent)
        return {"urgent_requests": True} if self.native else {}

    def state_sent(self, src: Source) -> None:
        """The page server, set up while the destination loads STATE (it must be there by
        COMMIT: requests and COMPLETE may come right after RUNNING)."""
        if self.owed is None:
            return  # hybrid that converged: it finishes as pre-copy
        assert src.ret is not None and src.session is not None
        assert src.session.urgent is not None
        self.server = PageServer(src.ram, self.owed, src.limiter)
        self.server.reconnected(src.session.urgent, None)
        src.ret.handlers.update(self._handlers())
        src.stats.event(f"postcopy-owed:{int(np.count_nonzero(self.owed))}")

    def _handlers(self) -> dict[RecordType, Callable[[Record], None]]:
        assert self.server is not None
        return {RecordType.PAGE_REQUEST: self.server.on_request,
                RecordType.COMPLETE: self._on_complete}

    def _on_complete(self, rec: Record) -> None:
        self._complete.append(Record(rec.type, memoryview(bytes(rec.payload))))
        self._done.set()

    def after_commit(self, src: Source) -> None:
        if self.server is None:
            return  # hybrid that converged: it finished as pre-copy
        handoff.acquire()  # requests are answered on the return path's thread: promptly
        if self.native:
            self.server.serve_natively()
        try:
            while True:
                try:
                    self._push_and_wait(src, self.server)
                    break
                except ConnectionLost as e:
                    self.server.stop_native()  # after a recovery, Python's path on both sides
                    missing = src.recover_postcopy(e, self._handlers())
                    self.server.reconnected(src.urgent_channel(), missing)
        finally:
            self.server.stop_native()
            handoff.release()
        counts = self.server.counts
        src.stats.bytes_sent += counts.bytes_sent
        src.stats.faults.pulled_ahead = counts.pulled_ahead
        src.stats.faults.queue_at_pull = counts.queue_at_pull
        src.stats.total_ms = src.elapsed_ms()

    def _push_and_wait(self, src: Source, server: PageServer) -> None:
        """Push what is owed until the destination says COMPLETE (it may before the pushes
        end: faults pulled the rest); ConnectionLost when the link breaks first."""
        assert src.ret is not None
        ret = src.ret
        try:
            server.push(src.main, self._done, ret.check)
            deadline = time.monotonic() + COMPLETE_WAIT
            while not self._done.wait(0.05):
                ret.check()
                if time.monotonic() > deadline:
                    raise Timeout("the destination never said COMPLETE after the last push")
        except ConnectionLost:
            ret.settle()  # a COMPLETE may be in just before the destination closed
            if not self._done.is_set():
                raise
        self._completed(src, self._complete[0])

    @staticmethod
    def _completed(src: Source, rec: Record) -> None:
        d = records.unpack(rec.payload, "COMPLETE", ("faults",))
        faults = d["faults"] if isinstance(d["faults"], dict) else {}
        lat = d.get("latency_ms") if isinstance(d.get("latency_ms"), list) else []
        recoveries = src.stats.faults.recoveries
        src.stats.faults = FaultStats.from_json(faults, lat or [])
        src.stats.faults.recoveries = recoveries
        if src.opts.verify_memory and d.get("verified") is True:
            src.stats.verified_memory = True
        src.stats.event("postcopy-complete")


class PostCopy(PostcopyTail, Strategy):
    name = "postcopy"
    postcopy = True

    def find_owed(self, src: Source) -> np.ndarray:
        return scan.populated(src.m.memory)
