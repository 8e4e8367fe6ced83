"""The source's view of the return path: a thread reading what the destination sends."""

from __future__ import annotations

import queue
import socket
import threading

from livemig.migration.errors import ConnectionLost, MigrationError, ProtocolError, RemoteError
from livemig.migration.wire import Record, RecordReader, RecordType


class ReturnPath:
    """Reads destination records in the background.

    ERROR records and read failures are kept in `failure` so the sending side can check
    between batches; ROUND_ACKs are counted; every other record is queued for `expect`.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._reader = RecordReader(sock, max_payload=1 << 20)
        self._queue: queue.Queue[Record] = queue.Queue()
        self.failure: MigrationError | None = None
        self.acked_rounds = 0
        self._thread = threading.Thread(target=self._run, name="migrate-return", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                rec = self._reader.read()
            except MigrationError as e:
                if self.failure is None:
                    self.failure = e
                self._queue.put(Record(RecordType.ERROR, memoryview(b"")))
                return
            if rec.type is RecordType.ERROR:
                self.failure = RemoteError(f"destination: {rec.text()}")
                self._queue.put(rec)
                return
            if rec.type is RecordType.ROUND_ACK:
                self.acked_rounds += 1
                continue
            self._queue.put(Record(rec.type, memoryview(bytes(rec.payload))))

    def settle(self, timeout: float = 1.0) -> None:
        """After a send failed: give the reader time to pick up the destination's ERROR."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self) -> None:
        """Raise what the destination reported, if anything."""
        if self.failure is not None:
            raise self.failure

    def expect(self, rtype: RecordType, timeout: float | None) -> Record:
        """Wait for the next queued record, which must be `rtype`."""
        try:
            rec = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise ConnectionLost(
                f"destination did not answer {rtype.name} within {timeout:.0f} s"
            ) from None
        if rec.type is RecordType.ERROR:
            self.check()
        if rec.type is not rtype:
            raise ProtocolError(f"destination sent {rec.type.name} where {rtype.name} was due")
        return rec
