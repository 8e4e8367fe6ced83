"""The source's view of the return path: a thread reading what the destination sends."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from livemig.migration import records
from livemig.migration.channels import Channel
from livemig.migration.errors import ConnectionLost, MigrationError, ProtocolError, RemoteError
from livemig.migration.wire import Record, RecordType

RETURN_LIMIT = 1 << 20  # the destination's records are small


class ReturnPath:
    """Reads destination records in the background.

    ERROR records and read failures are kept in `failure` so the sending side can check
    between batches; a ROUND_ACK moves `acked` (the last round the destination has placed,
    see `wait_acked`); a record with a
    handler (post-copy's page requests) goes to it, on this thread; every other record is
    queued for `expect`. With no channel (a one-way file session) nothing ever comes and
    `expect` is not to be called.
    """

    def __init__(self, chan: Channel) -> None:
        self.chan = chan
        chan.set_limit(RETURN_LIMIT)
        self._queue: queue.Queue[Record] = queue.Queue()
        self._early: list[Record] = []  # taken off the queue by an `expect` for another type
        self.handlers: dict[RecordType, Callable[[Record], None]] = {}
        self.failure: MigrationError | None = None
        self.acked = 0  # the last round the destination said it placed (ROUND_ACK)
        self._acked = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="migrate-return", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._read()
        finally:
            with self._acked:  # whoever waits for an ack learns that none will come
                self._acked.notify_all()

    def _read(self) -> None:
        while True:
            try:
                rec = self.chan.read()
            except MigrationError as e:
                if self.failure is None:
                    self.failure = e
                self._queue.put(Record(RecordType.ERROR, memoryview(b"")))
                return
            except (OSError, ValueError) as e:  # the channel was closed under us
                self.failure = self.failure or ConnectionLost(f"return path closed: {e}")
                self._queue.put(Record(RecordType.ERROR, memoryview(b"")))
                return
            if rec.type is RecordType.ERROR:
                self.failure = RemoteError(f"destination: {rec.text()}")
                self._queue.put(rec)
                return
            if rec.type is RecordType.ROUND_ACK:
                try:
                    self._on_round_ack(rec)
                except MigrationError as e:
                    self.failure = self.failure or e
                    self._queue.put(Record(RecordType.ERROR, memoryview(b"")))
                    return
                continue
            handler = self.handlers.get(rec.type)
            if handler is not None:
                try:
                    handler(rec)
                except MigrationError as e:
                    self.failure = self.failure or e
                    self._queue.put(Record(RecordType.ERROR, memoryview(b"")))
                    return
            else:
                self._queue.put(Record(rec.type, memoryview(bytes(rec.payload))))

    def _on_round_ack(self, rec: Record) -> None:
        n = records.unpack(rec.payload, "ROUND_ACK", ("round",))["round"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ProtocolError("ROUND_ACK record: round is not a count")
        with self._acked:
            self.acked = max(self.acked, n)
            self._acked.notify_all()

    def wait_acked(self, number: int, timeout: float) -> bool:
        """Wait up to `timeout` s until the destination has placed round `number`; whether it
        has (False too when the return path failed)."""
        with self._acked:
            return self._acked.wait_for(
                lambda: self.acked >= number or self.failure is not None, timeout,
            ) and self.failure is None

    def settle(self, timeout: float = 1.0) -> None:
        """After a send failed: give the reader time to pick up the destination's ERROR."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self) -> None:
        """Raise what the destination reported, if anything."""
        if self.failure is not None:
            raise self.failure

    def poll(self, rtype: RecordType) -> Record | None:
        """The next record if it is here and of type `rtype` (others wait for `expect`);
        raises what the destination reported."""
        self.check()
        for i, rec in enumerate(self._early):
            if rec.type is rtype:
                return self._early.pop(i)
        while True:
            try:
                rec = self._queue.get_nowait()
            except queue.Empty:
                return None
            if rec.type is RecordType.ERROR:
                self.check()
            if rec.type is rtype:
                return rec
            self._early.append(rec)

    def expect(self, rtype: RecordType, deadline: float,
               later: tuple[RecordType, ...] = ()) -> Record:
        """Wait until `deadline` (time.monotonic) for the next record, which must be `rtype`;
        records of the types in `later` may come first and wait for their own `expect`."""
        for i, rec in enumerate(self._early):
            if rec.type is rtype:
                return self._early.pop(i)
        while True:
            try:
                rec = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ConnectionLost(f"destination did not answer {rtype.name} in time") from None
            if rec.type is RecordType.ERROR:
                self.check()
            if rec.type is rtype:
                return rec
            if rec.type not in later:
                raise ProtocolError(
                    f"destination sent {rec.type.name} where {rtype.name} was due")
            self._early.append(rec)
