"""Source and destination state machines over real TCP on loopback.

The machine here is `MemoryMachine` (RAM and a state, no vCPUs): these tests are about the
engine. Migrations of real guests on KVM are in test_migrate_kvm.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import future_version_destination
from memmachine import MemoryMachine, memory_config

from livemig.contract import MachineConfig
from livemig.migration import (
    Cancelled,
    CommitUnconfirmed,
    ConnectionLost,
    MigrationError,
    MigrationOptions,
    Mode,
    RemoteError,
    VersionError,
    hello,
    migrate,
    receive,
    wire,
)

MODES = [Mode.PRECOPY, Mode.STOP_COPY]


class Proxy:
    """TCP relay between source and destination that can corrupt or cut the forward stream."""

    def __init__(self, target: tuple[str, int], corrupt_at: int = -1, cut_at: int = -1) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.addr = self.srv.getsockname()
        self.target, self.corrupt_at, self.cut_at = target, corrupt_at, cut_at
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        a, _ = self.srv.accept()
        b = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(b, a, False), daemon=True).start()
        self._pump(a, b, True)

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool) -> None:
        seen = 0
        try:
            while True:
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                if forward and 0 <= self.corrupt_at - seen < len(data):
                    data[self.corrupt_at - seen] ^= 0x5A
                if forward and 0 <= self.cut_at - seen < len(data):
                    dst.sendall(data[: self.cut_at - seen])
                    break
                dst.sendall(data)
                seen += len(data)
        except OSError:
            pass
        try:  # pass the end on, but let the other direction finish (an ERROR may be in it)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class Dest:
    """A destination receiving in a thread."""

    def __init__(self, build: Callable[[MachineConfig], Any] = MemoryMachine) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.addr = self.srv.getsockname()
        self.machine: MemoryMachine | None = None
        self.error: Exception | None = None
        self.built: list[MemoryMachine] = []

        def build_and_keep(cfg: MachineConfig) -> Any:
            m = build(cfg)
            self.built.append(m)
            return m

        def run() -> None:
            conn, _ = self.srv.accept()
            try:
                self.machine, self.stats = receive(conn, build_and_keep)
            except Exception as e:
                self.error = e
            finally:
                conn.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(30)


class Guest:
    """Sweeps over pages of a MemoryMachine while it runs, as a guest would; honours the
    throttle by sleeping longer."""

    def __init__(
        self, m: MemoryMachine, pages: np.ndarray, burst: int = 64, pause: float = 0.0005
    ) -> None:
        self.m, self.pages, self.burst, self.pause = m, pages, burst, pause
        self.stop = threading.Event()
        self.value = 1
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pos = 0
        while not self.stop.is_set():
            with self.m.vcpu_lock:
                running = self.m.running
                if running:
                    idx = np.take(self.pages, np.arange(pos, pos + self.burst), mode="wrap")
                    pos = (pos + self.burst) % len(self.pages)
                    self.value = self.value % 255 + 1
                    self.m.memory.write(idx, self.value)
                    self.m.counter += 1
            if not running:
                time.sleep(0.0005)
                continue
            time.sleep(self.pause / max(0.01, 1 - self.m.throttle))


def source(mem: int = 32 << 20) -> MemoryMachine:
    m = MemoryMachine(memory_config(mem, vcpus=2))
    rng = np.random.default_rng(5)
    n = len(m.memory.pages)
    m.memory.pages[: n // 2] = rng.integers(0, 256, size=(n // 2, 4096), dtype=np.uint8)
    m.start()
    return m


def connect(addr: Any) -> socket.socket:
    return socket.create_connection(addr)


@pytest.mark.parametrize("mode", MODES)
def test_migration_moves_ram_and_state(mode: Mode) -> None:
    src = source()
    before = src.memory.pages.copy()
    d = Dest()
    stats = migrate(src, connect(d.addr), MigrationOptions(mode=mode, verify_memory=True))
    d.join()
    assert d.error is None and d.machine is not None
    assert np.array_equal(d.machine.memory.pages, before)
    assert d.machine.started and d.machine.loaded is not None
    assert stats.status == "completed" and stats.verified_memory
    assert not src.running  # the source stays paused for good
    n = len(before)
    assert stats.pages()["raw"] == n // 2  # zero pages are never sent in a first round
    assert stats.mode == mode.value and stats.bytes_sent > n // 2 * 4096


@pytest.mark.parametrize("mode", MODES)
def test_live_migration_with_writer(mode: Mode) -> None:
    src = source()
    g = Guest(src, np.arange(0, len(src.memory.pages), 3))
    time.sleep(0.05)
    d = Dest()
    stats = migrate(src, connect(d.addr), MigrationOptions(mode=mode, verify_memory=True))
    g.stop.set()
    d.join()
    assert d.error is None and d.machine is not None
    assert np.array_equal(d.machine.memory.pages, src.memory.pages)
    assert d.machine.counter == src.counter
    assert stats.verified_memory
    if mode is Mode.PRECOPY:
        assert len(stats.rounds) >= 2


def test_progress_and_bandwidth_cap() -> None:
    src = source(8 << 20)
    d = Dest()
    seen = []
    t = time.monotonic()
    migrate(src, connect(d.addr), MigrationOptions(max_bandwidth=20e6), progress=seen.append)
    elapsed = time.monotonic() - t
    d.join()
    assert d.error is None
    assert elapsed > 0.15  # 4 MiB of pages at 20 MB/s
    assert seen and seen[-1].round >= 1 and seen[-1].sent_bytes > 0


def test_auto_converge_throttles_until_it_converges() -> None:
    src = source(16 << 20)
    g = Guest(src, np.arange(0, 1024), burst=128)
    d = Dest()
    opts = MigrationOptions(max_bandwidth=32e6, auto_converge=True, max_downtime_ms=50,
                            verify_memory=True)
    stats = migrate(src, connect(d.addr), opts)
    g.stop.set()
    d.join()
    assert d.error is None and stats.status == "completed"
    assert stats.throttle >= 0.2 and src.throttles[0] == pytest.approx(0.2)
    assert stats.to_json()["throttle"] == stats.throttle
    assert src.throttles[-1] == 0.0 or not src.running


def test_without_auto_converge_it_stops_when_rounds_stop_shrinking() -> None:
    src = source(16 << 20)
    g = Guest(src, np.arange(0, 1024), burst=128)
    d = Dest()
    opts = MigrationOptions(max_bandwidth=32e6, max_downtime_ms=50, verify_memory=True)
    stats = migrate(src, connect(d.addr), opts)
    g.stop.set()
    d.join()
    assert d.error is None and stats.status == "completed" and stats.throttle == 0
    assert 2 <= len(stats.rounds) <= 4


def assert_source_alive(src: MemoryMachine) -> None:
    assert src.running and src.throttle == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_cancel_mid_transfer(mode: Mode) -> None:
    src = source(64 << 20)
    d = Dest()
    cancel = threading.Event()

    def progress(p: Any) -> None:
        if p.sent_bytes > 4 << 20:
            cancel.set()

    with pytest.raises(Cancelled) as ei:
        migrate(src, connect(d.addr), MigrationOptions(mode=mode, max_bandwidth=100e6),
                progress=progress, cancel=cancel)
    d.join()
    assert_source_alive(src)
    assert ei.value.stats.status == "cancelled"  # type: ignore[attr-defined]
    assert isinstance(d.error, RemoteError) and "aborted" in str(d.error)
    assert d.built and d.built[0].closed and not d.built[0].started


def test_corrupted_record_is_refused() -> None:
    src = source()
    d = Dest()
    p = Proxy(d.addr, corrupt_at=300_000)
    with pytest.raises(RemoteError, match="destination: corrupt PAGES record"):
        migrate(src, connect(p.addr), MigrationOptions())
    d.join()
    assert_source_alive(src)
    assert "CRC mismatch" in str(d.error)
    assert d.built[0].closed and not d.built[0].started


@pytest.mark.parametrize("cut_at", [10, 200, 5_000_000])
def test_connection_cut(cut_at: int) -> None:
    src = source()
    d = Dest()
    p = Proxy(d.addr, cut_at=cut_at)
    with pytest.raises(MigrationError):
        migrate(src, connect(p.addr), MigrationOptions(max_bandwidth=200e6))
    d.join()
    assert_source_alive(src)
    assert isinstance(d.error, ConnectionLost)


def test_destination_dies_mid_transfer() -> None:
    src = source(64 << 20)
    srv = socket.create_server(("127.0.0.1", 0))

    def die() -> None:
        c, _ = srv.accept()
        r = wire.RecordReader(c)
        r.read()
        welcome = hello.Hello(features=[], encodings=["zero", "raw"])
        wire.send_record(c, wire.RecordType.WELCOME, welcome.encode())
        r.read()
        wire.send_record(c, wire.RecordType.CONFIG_OK)
        r.read()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        c.close()  # RST, as a killed process's socket would

    threading.Thread(target=die, daemon=True).start()
    with pytest.raises(ConnectionLost):
        migrate(src, connect(srv.getsockname()), MigrationOptions())
    assert_source_alive(src)


def test_wrong_protocol_version() -> None:
    src = source()
    with pytest.raises(VersionError, match="protocol version 99"):
        migrate(src, connect(future_version_destination()), MigrationOptions())
    assert_source_alive(src)


def test_garbage_peer_is_refused_by_destination() -> None:
    d = Dest()
    c = connect(d.addr)
    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    d.join()
    assert "bad record magic" in str(d.error)
    assert not d.built


def test_out_of_order_record_is_refused() -> None:
    d = Dest()
    c = connect(d.addr)
    wire.send_record(c, wire.RecordType.COMMIT)
    d.join()
    assert "COMMIT record not allowed in state await-hello" in str(d.error)
    reply = wire.RecordReader(c).read()
    assert reply.type is wire.RecordType.ERROR and "not allowed" in reply.text()


def test_verify_mismatch_refuses_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    from livemig.migration import destination

    real_place = destination.Destination._place

    def lossy_place(self: Any, batch: Any, length: int) -> None:
        # After each batch is in RAM, however it got there (raw pages come straight off the
        # socket, direct.py), page 7 is damaged.
        real_place(self, batch, length)
        self.ram[7, 9] = 0x5A if self.ram[7, 9] != 0x5A else 0xA5

    monkeypatch.setattr(destination.Destination, "_place", lossy_place)
    src = source()
    d = Dest()
    with pytest.raises(RemoteError, match="memory verification failed.*page 7.*refusing to COMMIT"):
        migrate(src, connect(d.addr), MigrationOptions(verify_memory=True))
    d.join()
    assert_source_alive(src)
    assert d.built[0].closed and not d.built[0].started


def test_state_refused_by_destination_machine() -> None:
    class OtherCpu(MemoryMachine):
        cpu_model = "other"

    src = source()
    d = Dest(OtherCpu)
    with pytest.raises(RemoteError, match="CPU model"):
        migrate(src, connect(d.addr), MigrationOptions())
    d.join()
    assert_source_alive(src)


def test_source_never_resumes_after_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination vanishes right after COMMIT: the source must stay paused."""
    from livemig.migration import destination

    def vanish(self: Any, rec: Any) -> None:
        sock = self.sess.main.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        sock.close()
        raise destination.ConnectionLost("killed")

    monkeypatch.setattr(destination.Destination, "_on_commit", vanish)
    src = source()
    resumed = []
    src.resume = lambda: resumed.append(1)  # type: ignore[method-assign]
    d = Dest()
    with pytest.raises(CommitUnconfirmed, match="both sides stay paused") as ei:
        migrate(src, connect(d.addr), MigrationOptions(commit_timeout_s=3))
    assert not src.running and not resumed
    assert ei.value.stats.status == "commit-unconfirmed"  # type: ignore[attr-defined]


def test_destination_discards_copy_when_commit_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """READY sent, then the connection dies before COMMIT: the destination never runs the
    copy and discards it (issue 8: no orphaned paused copy); the source resumes."""
    from livemig.migration import source as source_mod

    real_expect = source_mod.Source.expect

    def cut_after_ready(self: Any, rtype: wire.RecordType, deadline: float) -> None:
        real_expect(self, rtype, deadline)
        if rtype is wire.RecordType.READY:
            self.main.sock.shutdown(socket.SHUT_RDWR)
            raise ConnectionLost("cut")

    monkeypatch.setattr(source_mod.Source, "expect", cut_after_ready)
    src = source(8 << 20)
    d = Dest()
    with pytest.raises(ConnectionLost):
        migrate(src, connect(d.addr), MigrationOptions())
    d.join()
    assert isinstance(d.error, ConnectionLost) and "discarded its copy" in str(d.error)
    kept = d.built[0]
    assert kept.closed and not kept.started
    assert src.running  # COMMIT was never sent, so the source resumed
