"""Resolving a lost COMMIT: which copy runs is decided once, at the destination, and asked.

The destination records, per session, the first of two events: it received COMMIT (the copy
runs there) or it gave the copy up (connection lost or timed out after READY, or a resolve
question came first). A source left paused without RUNNING asks on a new, authenticated
connection (role RESOLVE): the answer is final, so exactly one copy runs.

    source                          destination
    HELLO role=resolve session=ID ─▶
                                 ◀─ WELCOME (+ AUTH both ways)
                                 ◀─ OUTCOME {"committed": true | false | nil (unknown)}
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from livemig.migration import handshake, records
from livemig.migration import hello as hello_mod
from livemig.migration.channels import Channel, Role
from livemig.migration.codecs import SUPPORTED
from livemig.migration.errors import MigrationError, ProtocolError, RemoteError
from livemig.migration.security import Security
from livemig.migration.session import Redial
from livemig.migration.wire import RecordType

RESOLVE_TIMEOUT = 10.0
KEEP = 256  # outcomes remembered per listener


class Outcomes:
    """Destination side: the one decision per session, first come first kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decided: OrderedDict[bytes, bool] = OrderedDict()

    def decide(self, session: bytes, committed: bool) -> bool:
        """Record `committed` unless already decided; returns the decision that stands."""
        with self._lock:
            if session not in self._decided:
                self._decided[session] = committed
                while len(self._decided) > KEEP:
                    self._decided.popitem(last=False)
            return self._decided[session]

    def get(self, session: bytes) -> bool | None:
        with self._lock:
            return self._decided.get(session)


def answer(chan: Channel, outcomes: Outcomes, session: bytes,
           known: bool) -> bool | None:
    """Destination side: a pending session is given up now (a source asking has not had
    RUNNING, and nothing may run twice); then the outcome is sent."""
    result = outcomes.decide(session, False) if known else outcomes.get(session)
    chan.send(RecordType.OUTCOME, records.pack({"committed": result}))
    return result


def ask(redial: Redial, sec: Security, session: bytes) -> bool:
    """Source side: did the destination receive COMMIT for `session`? MigrationError when
    it cannot say."""
    deadline = time.monotonic() + RESOLVE_TIMEOUT
    chan = redial(Role.RESOLVE)
    try:
        h = hello_mod.Hello(encodings=list(SUPPORTED), role=Role.RESOLVE.value, session=session)
        handshake.client(chan, h, sec, deadline)
        rec = chan.read(deadline)
        if rec.type is RecordType.ERROR:
            raise RemoteError(f"destination: {rec.text()}")
        if rec.type is not RecordType.OUTCOME:
            raise ProtocolError(f"destination sent {rec.type.name} where OUTCOME was due")
        committed = records.unpack(rec.payload, "OUTCOME", ("committed",))["committed"]
    finally:
        chan.close()
    if committed is None:
        raise MigrationError("the destination does not know this migration (restarted?)")
    return bool(committed)
