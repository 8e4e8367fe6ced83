"""The source's return path (returnpath.py): ROUND_ACKs tell how far the destination has placed
pages, which the source waits on before it pauses the guest; a malformed one fails the path."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from test_migrate_engine import Dest, Guest, connect, source

from livemig.migration import MigrationOptions, migrate, records, wire
from livemig.migration.channels import SocketChannel
from livemig.migration.errors import ProtocolError
from livemig.migration.returnpath import ReturnPath
from livemig.migration.wire import RecordType


def _path() -> tuple[ReturnPath, socket.socket]:
    a, b = socket.socketpair()
    ret = ReturnPath(SocketChannel(a))
    ret.start()
    return ret, b


def test_round_acks_move_what_the_source_waits_on() -> None:
    ret, peer = _path()
    with peer:
        assert not ret.wait_acked(1, 0.05)
        wire.send_buffers(peer, wire.frame(RecordType.ROUND_ACK, records.pack({"round": 3})))
        assert ret.wait_acked(3, 5.0) and ret.acked == 3
        wire.send_buffers(peer, wire.frame(RecordType.ROUND_ACK, records.pack({"round": 2})))
        wire.send_buffers(peer, wire.frame(RecordType.READY))
        assert ret.expect(RecordType.READY, time.monotonic() + 5).type is RecordType.READY
        assert ret.acked == 3  # an older round does not move it back


@pytest.mark.parametrize("payload", [b"\xc1", records.pack({"round": "x"}),
                                     records.pack({"round": -1}), records.pack({"round": True}),
                                     records.pack({})])
def test_a_malformed_round_ack_fails_the_return_path(payload: bytes) -> None:
    ret, peer = _path()
    with peer:
        wire.send_buffers(peer, wire.frame(RecordType.ROUND_ACK, payload))
        t = time.monotonic()
        assert not ret.wait_acked(1, 5.0)
        assert time.monotonic() - t < 2.0  # the waiter learns at once that no ack will come
        with pytest.raises(ProtocolError):
            ret.check()


def test_source_lets_the_destination_catch_up_before_the_pause() -> None:
    src = source(32 << 20)
    g = Guest(src, np.arange(0, 256))
    d = Dest()
    try:
        stats = migrate(src, connect(d.addr), MigrationOptions(verify_memory=True))
    finally:
        g.stop.set()
    d.join()
    assert d.error is None and stats.status == "completed"
    events = [e for _, e in stats.events]
    caught = [i for i, e in enumerate(events) if e.startswith("caught-up:")]
    assert caught and caught[0] < events.index("paused"), events
