"""The C fault path (faultpath.py, native/faultpath.c) in one process: real userfaultfd on a
memfd mapping, real socket pairs, Python's framing and page batches on the other end.
Malformed records from the peer end a loop with a protocol error, never anything worse."""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import struct
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.contract import PAGE_SIZE
from livemig.migration import faultpath, pages
from livemig.migration.channels.base import Role
from livemig.migration.channels.sockets import SocketChannel
from livemig.migration.errors import ConnectionLost, ProtocolError
from livemig.migration.pageserver import encode_request, stateless_codecs
from livemig.migration.uffd import UffdError, Userfaultfd
from livemig.migration.wire import RecordType, frame

pytestmark = pytest.mark.skipif(not faultpath.available(),
                                reason="livemig._faultpath is not built (pip install -e .)")

NPAGES = 64


def _pair() -> tuple[socket.socket, SocketChannel]:
    """A socket for the loop, a channel for the test's side."""
    a, b = socket.socketpair()
    return a, SocketChannel(b, Role.URGENT)


class Ram:
    """NPAGES of memfd-backed RAM registered with userfaultfd (MISSING mode)."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("faultpath-test", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, NPAGES * PAGE_SIZE)
        self.map = mmap.mmap(self.fd, NPAGES * PAGE_SIZE)
        self.pages = np.frombuffer(self.map, np.uint8).reshape(NPAGES, PAGE_SIZE)
        self.base = int(self.pages.ctypes.data)
        try:
            self.uffd = Userfaultfd(self.base, NPAGES * PAGE_SIZE)
        except UffdError as e:
            pytest.skip(f"userfaultfd not available here: {e}")

    def close(self) -> None:
        self.uffd.close()
        del self.pages
        self.map.close()
        os.close(self.fd)


@dataclass
class Rig:
    """A destination loop and the test's ends of its connections."""

    loop: faultpath.FaultLoop
    main: SocketChannel
    urgent: SocketChannel
    arrays: faultpath.FaultArrays
    socks: tuple[socket.socket, socket.socket]  # the loop's ends: open while it runs

    def close(self) -> None:
        self.loop.close()
        for s in (*self.socks, self.main.sock, self.urgent.sock):
            s.close()


def _rig(ram: Ram, owed: np.ndarray, go: bool = True) -> Rig:
    main, main_peer = _pair()
    urgent, urgent_peer = _pair()
    arrays = faultpath.FaultArrays.new(owed, np.zeros(NPAGES, bool), np.zeros(NPAGES, bool))
    loop = faultpath.FaultLoop(ram.uffd.fd, main, urgent, ram.base, 0, arrays,
                               int(np.count_nonzero(owed)))
    if go:
        loop.go()
    return Rig(loop, main_peer, urgent_peer, arrays, (main, urgent))


def test_a_parked_loop_reads_nothing_until_go() -> None:
    """Made before READY, the loop must leave the connections to Python until COMMIT."""
    ram, content = Ram(), _content()
    rig = _rig(ram, np.ones(NPAGES, bool), go=False)
    try:
        rig.main.send(RecordType.PAGES, *_batch(list(range(NPAGES)), content))
        threading.Event().wait(0.3)
        assert rig.loop.remaining == NPAGES and rig.loop.result is None
        rig.loop.go()
        os.eventfd_read(rig.loop.done)
        assert rig.loop.remaining == 0
        assert np.array_equal(ram.pages, content)
    finally:
        rig.close()
        ram.close()


def _touch(ram: Ram, page: int, offset: int, out: list[int]) -> None:
    """Read one byte of RAM without the GIL (ctypes releases it): a thread blocked on a
    fault must not hold up the thread that answers it."""
    buf = ctypes.create_string_buffer(1)
    ctypes.memmove(buf, ram.base + page * PAGE_SIZE + offset, 1)
    out.append(buf.raw[0])


def _batch(idx: list[int], content: np.ndarray) -> list[bytes | memoryview]:
    b = pages.BatchEncoder(content, stateless_codecs()).encode(np.asarray(idx), frozen=True)
    return [b.meta, *b.data]


def _content() -> np.ndarray:
    rng = np.random.default_rng(7)
    c = rng.integers(1, 255, (NPAGES, PAGE_SIZE), dtype=np.uint8)
    c[5] = 0  # one zero page: sent with the zero codec
    return c


def test_pushes_and_a_pulled_page_land_and_the_loop_says_done() -> None:
    ram, content = Ram(), _content()
    owed = np.ones(NPAGES, bool)
    owed[60:] = False  # the source held nothing there: a fault fills zeroes
    rig = _rig(ram, owed)
    loop = rig.loop
    try:
        rig.main.send(RecordType.PAGES, *_batch(list(range(0, 20)), content))
        touched: list[int] = []
        reader = threading.Thread(target=lambda: (_touch(ram, 40, 0, touched),
                                                  _touch(ram, 61, 7, touched)))
        reader.start()  # faults on page 40 (owed: asked for) and 61 (not owed: zeroes)
        req = rig.urgent.read()
        assert req.type is RecordType.PAGE_REQUEST
        assert np.frombuffer(req.payload, "<u8").tolist() == [40]
        rig.urgent.send(RecordType.PAGES, *_batch([40], content))
        reader.join(10)
        assert touched == [int(content[40, 0]), 0]
        rig.main.send(RecordType.PAGES, *_batch([p for p in range(20, 60) if p != 40], content))
        os.eventfd_read(loop.done)
        assert loop.remaining == 0 and loop.result is None
        assert np.array_equal(ram.pages[:60], content[:60])
        c = loop.counters
        assert c[faultpath.D_PULLED] == 1 and c[faultpath.D_PUSHED] == 59
        assert c[faultpath.D_ZERO] == 1 and len(loop.latencies_ms()) == 1
        assert rig.arrays.waiting() == {}
    finally:
        assert loop.stop() == 0
        rig.close()
        ram.close()


def test_source_side_answers_requests_from_ram() -> None:
    content = _content()
    sock, peer = _pair()
    owed, sent = np.ones(NPAGES, bool), np.zeros(NPAGES, bool)
    server = faultpath.RequestServer(sock, int(content.ctypes.data), owed, sent)
    try:
        peer.send(RecordType.PAGE_REQUEST, encode_request([3, 9, 5]))
        rec = peer.read()
        batch = pages.decode(rec.payload, NPAGES, stateless_codecs())
        assert batch.idx.tolist() == [3, 9, 5]
        got = np.frombuffer(batch.data, np.uint8).reshape(-1, PAGE_SIZE)
        assert np.array_equal(got, content[[3, 9, 5]])
        assert sent[[3, 5, 9]].all() and sent.sum() == 3  # marked before they went out
        # the counters follow the write (the cursor last), so they may trail the answer a little
        wait_for(lambda: server.counters[faultpath.S_CURSOR] == 6, 5,
                 "the cursor after the last page asked")
        assert server.counters[faultpath.S_PULLED] == 3
        peer.send(RecordType.PAGE_REQUEST, encode_request([NPAGES]))  # outside RAM
        for _ in range(100):
            if server.result is not None:
                break
            threading.Event().wait(0.05)
        assert isinstance(server.error(), ProtocolError)
    finally:
        server.stop()
        sock.close()
        peer.close()


def _header(rtype: int, payload: bytes) -> bytes:
    return b"".join(bytes(x) for x in frame(RecordType(rtype), payload))


records = st.one_of(
    st.binary(min_size=1, max_size=64),  # garbage
    st.builds(lambda p: _header(RecordType.PAGES, p), st.binary(max_size=200)),
    st.builds(lambda n, idx, lens, ids: _header(RecordType.PAGES,
                                                struct.pack("<II", n, 0) + idx + lens + ids),
              st.integers(0, 600), st.binary(max_size=64), st.binary(max_size=32),
              st.binary(max_size=16)),
    st.builds(lambda p: _header(RecordType.ROUND_END, p), st.binary(max_size=16)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_a_malformed_record_ends_the_destination_loop_cleanly(data: bytes) -> None:
    ram = Ram()
    rig = _rig(ram, np.ones(NPAGES, bool))
    try:
        rig.main.sock.sendall(data)
        rig.main.sock.shutdown(socket.SHUT_WR)  # then EOF: the loop ends either way
        os.eventfd_read(rig.loop.done)
        error = rig.loop.error()
        if isinstance(error, ProtocolError):
            assert rig.loop.remaining == NPAGES  # nothing was installed from it
        else:  # a well-formed record after all: installed, then the EOF
            assert isinstance(error, ConnectionLost), error
    finally:
        rig.close()
        ram.close()


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.binary(min_size=1, max_size=64),
                 st.builds(lambda p: _header(RecordType.PAGE_REQUEST, p),
                           st.binary(max_size=64))))
def test_a_malformed_request_ends_the_source_loop_cleanly(data: bytes) -> None:
    content = _content()
    sock, peer = _pair()
    server = faultpath.RequestServer(sock, int(content.ctypes.data), np.ones(NPAGES, bool),
                                     np.zeros(NPAGES, bool))
    try:
        peer.sock.sendall(data)
        peer.sock.shutdown(socket.SHUT_WR)
        for _ in range(200):
            if server.result is not None:
                break
            threading.Event().wait(0.01)
        assert server.result is not None and server.result != 0
    finally:
        server.stop()
        sock.close()
        peer.close()


def test_a_peer_that_stops_reading_does_not_hold_the_source_loop() -> None:
    """Answers to 4096 requested pages fill the socket; the peer reads none: stop() still
    ends the loop (its sends wait on the stop signal too)."""
    content = _content()
    sock, peer = _pair()
    server = faultpath.RequestServer(sock, int(content.ctypes.data), np.ones(NPAGES, bool),
                                     np.zeros(NPAGES, bool))
    try:
        peer.send(RecordType.PAGE_REQUEST, encode_request(list(range(NPAGES)) * 64))
        threading.Event().wait(0.2)
        stopper = threading.Thread(target=server.stop, daemon=True)
        stopper.start()
        stopper.join(10)
        assert not stopper.is_alive(), "stop() hung on a blocked send"
        assert server.result == 0
    finally:
        sock.close()
        peer.close()
