"""Page streams (`--streams N`, QEMU's multifd): PAGES on N extra connections `pages-0..N-1`.

Batch k of the migration goes on stream k % N. Each stream has its own thread on both sides,
so framing, CRCs, socket copies and validation run in parallel; the destination still places
batches in k order (a turnstile), so every codec sees the same order as on one channel and a
page sent twice never lands out of order. ROUND_END, on the main channel, carries the number
of batches sent so far; the destination answers it only once that many are placed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from livemig.migration.channels import Channel
from livemig.migration.errors import ConnectionLost, MigrationError, Timeout
from livemig.migration.pages import EncodedBatch
from livemig.migration.wire import RecordType

QUEUE_DEPTH = 2  # batches waiting per stream: enough to keep each socket busy


class SourceStreams:
    """Sends batches round-robin on the page channels, each from its own thread."""

    def __init__(self, chans: list[Channel], release: Callable[[EncodedBatch], None]) -> None:
        self.chans = chans
        self.release = release
        self.sent = 0  # batches handed over so far (the next batch's number)
        self.error: MigrationError | None = None
        self._queues: list[queue.Queue[tuple[EncodedBatch, float | None] | None]] = [
            queue.Queue(QUEUE_DEPTH) for _ in chans]
        self._pending = 0
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"pages-{i}",
                                          daemon=True) for i in range(len(chans))]
        for t in self._threads:
            t.start()

    def send(self, batch: EncodedBatch, deadline: float | None) -> None:
        """Queue batch number `sent` on its stream (blocks while that stream is full)."""
        q = self._queues[self.sent % len(self.chans)]
        with self._cond:
            self._pending += 1
        while True:
            self.check()
            try:
                q.put((batch, deadline), timeout=0.05)
                break
            except queue.Full:
                continue
        self.sent += 1

    def _run(self, i: int) -> None:
        q = self._queues[i]
        while (item := q.get()) is not None:
            batch, deadline = item
            try:
                if self.error is None:
                    self.chans[i].send(RecordType.PAGES, batch.meta, *batch.data,
                                       deadline=deadline)
            except MigrationError as e:
                self.error = self.error or e
            finally:
                self.release(batch)
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def check(self) -> None:
        """Raise the first stream's failure, if any."""
        if self.error is not None:
            raise self.error

    def flush(self) -> None:
        """Wait until every queued batch is on the wire (or a stream failed)."""
        with self._cond:
            while self._pending and self.error is None:
                self._cond.wait(0.05)
        self.check()

    def close(self) -> None:
        self.error = self.error or ConnectionLost("page streams closed")
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join(5)


class DestStreams:
    """Reads batches on each page channel in parallel; finishes and places them in order.

    `begin(chan)` reads what of a channel's next batch may be read out of turn (its header
    and tables) and returns the rest of the work (receiving its data into RAM, placing it),
    which runs in the batch's turn: batch k only after batch k-1, never two at once.
    """

    def __init__(self, chans: list[Channel],
                 begin: Callable[[Channel], Callable[[], None]]) -> None:
        self.chans = chans
        self.begin = begin
        self.applied = 0
        self.error: MigrationError | None = None
        self._closing = False
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"pages-{i}",
                                          daemon=True) for i in range(len(chans))]
        for t in self._threads:
            t.start()

    def _fail(self, e: MigrationError) -> None:
        with self._cond:
            if not self._closing and self.error is None:
                self.error = e
            self._cond.notify_all()

    def _run(self, i: int) -> None:
        seq, n = i, len(self.chans)
        try:
            while True:
                finish = self.begin(self.chans[i])
                with self._cond:
                    while self.applied != seq and self.error is None and not self._closing:
                        self._cond.wait()
                    if self.error is not None or self._closing:
                        return
                finish()  # this batch's turn: no other stream places until it is counted
                with self._cond:
                    self.applied += 1
                    self._cond.notify_all()
                seq += n
        except MigrationError as e:
            self._fail(e)
        except Exception as e:  # a bug: the migration fails, the source is told
            self._fail(MigrationError(f"page stream {i} failed: {type(e).__name__}"))

    def wait_placed(self, count: int, deadline: float) -> None:
        """Return once `count` batches are placed; raise a stream's failure or Timeout."""
        with self._cond:
            while self.applied < count and self.error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"page streams delivered {self.applied} of {count} batches "
                                  "in time")
                self._cond.wait(remaining)
            if self.error is not None:
                raise self.error

    def close(self) -> None:
        """Stop the readers (nothing is placed after this returns)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for c in self.chans:
            c.close()
        for t in self._threads:
            t.join(5)
