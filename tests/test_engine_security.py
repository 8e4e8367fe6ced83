"""Authenticated sessions and the concurrent listener, engine level (MemoryMachine, loopback).

Real guests in separate processes are in test_security_cli.py; these pin the protocol: PSK
proofs both ways, replays, TLS with and without the right CA, return connections, resolve.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import wait_for
from memmachine import MemoryMachine
from test_migrate_engine import source

from livemig.migration import (
    AuthError,
    ConnectionLost,
    MigrationError,
    MigrationOptions,
    RemoteError,
    Security,
    migrate,
)
from livemig.migration.channels import Role
from livemig.migration.credentials import client_context, load_tls_dir, make_tls_dir, server_context
from livemig.migration.listener import Incoming, Listener
from livemig.migration.transport import Address, bind, dial

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def tls_security(d: Path) -> Security:
    files = load_tls_dir(str(d))
    return Security(tls_client=client_context(files), tls_server=server_context(files))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Security]:
    base = tmp_path_factory.mktemp("pki")
    make_tls_dir(str(base / "a"), ca_dir=str(base / "ca"))
    make_tls_dir(str(base / "b"), ca_dir=str(base / "ca"))
    make_tls_dir(str(base / "evil"), ca_dir=str(base / "evil-ca"))
    return {n: tls_security(base / n) for n in ("a", "b", "evil")}


class Dst:
    """A Listener on loopback building MemoryMachines; logs what it refused."""

    def __init__(self, sec: Security, **kw: Any) -> None:
        self.addr = Address("127.0.0.1", 0)
        self.srv = bind(self.addr)
        self.addr = Address("127.0.0.1", self.srv.getsockname()[1])
        self.built: list[MemoryMachine] = []
        self.logs: list[str] = []
        self.lst = Listener(self.srv, sec, self._build, self.logs.append, **kw)
        self.lst.start()

    def _build(self, cfg: Any) -> MemoryMachine:
        m = MemoryMachine(cfg)
        self.built.append(m)
        return m

    def result(self, timeout: float = 20) -> Incoming:
        return self.lst.results.get(timeout=timeout)

    def close(self) -> None:
        self.lst.close()


def send(src: MemoryMachine, dst: Dst, sec: Security, **opts: Any) -> Any:
    main = dial(dst.addr, sec)
    return migrate(src, main, MigrationOptions(verify_memory=True, **opts), security=sec,
                   redial=lambda role: dial(dst.addr, sec, role))


def assert_moved(src: MemoryMachine, before: np.ndarray, res: Incoming) -> None:
    assert res.error is None and res.machine is not None, res.error
    assert np.array_equal(res.machine.memory.pages, before)
    assert res.machine.started and not src.running


@pytest.mark.parametrize("kind", ["psk", "tls", "psk+tls"])
def test_authenticated_migration(kind: str, pki: dict[str, Security]) -> None:
    a, b = pki["a"], pki["b"]
    if kind == "psk":
        a, b = Security(key=KEY), Security(key=KEY)
    elif kind == "psk+tls":
        a = Security(KEY, a.tls_client, a.tls_server)
        b = Security(KEY, b.tls_client, b.tls_server)
    dst = Dst(b)
    src = source()
    before = src.memory.pages.copy()
    stats = send(src, dst, a)
    assert stats.status == "completed" and stats.verified_memory and stats.security == kind
    assert_moved(src, before, dst.result())
    if "tls" in kind:  # TLS is not duplex: the answers came on their own connection
        assert set(stats.channels) == {"main", "return"}
    dst.close()


@pytest.mark.parametrize(("src_sec", "dst_sec", "src_says", "dst_says"), [
    (Security(), Security(key=KEY), "requires a pre-shared key", "no pre-shared key"),
    (Security(key=KEY), Security(), "has no pre-shared key", "requires the pre-shared key"),
    (Security(key=OTHER_KEY), Security(key=KEY), "wrong key", "gave up in the hello"),
])
def test_psk_refusals(src_sec: Security, dst_sec: Security, src_says: str,
                      dst_says: str) -> None:
    dst = Dst(dst_sec)
    src = source()
    with pytest.raises(MigrationError, match=src_says):
        send(src, dst, src_sec)
    assert src.running and not dst.built
    time.sleep(0.3)
    said = list(dst.logs)
    while not dst.lst.results.empty():
        said.append(str(dst.result().error))
    assert any(dst_says in line for line in said), said
    dst.close()


def test_replayed_hello_is_refused() -> None:
    """Record a good session's first bytes (HELLO, then AUTH) and play them back."""
    dst = Dst(Security(key=KEY))
    src = source()
    recorded = bytearray()
    server = socket.create_server(("127.0.0.1", 0))

    def pump() -> None:
        a, _ = server.accept()
        b = socket.create_connection(("127.0.0.1", dst.addr.port))
        threading.Thread(target=relay, args=(b, a, None), daemon=True).start()
        relay(a, b, recorded)

    threading.Thread(target=pump, daemon=True).start()
    addr = Address("127.0.0.1", server.getsockname()[1])
    migrate(src, dial(addr, Security(key=KEY)), MigrationOptions(),
            security=Security(key=KEY))
    assert dst.result().error is None
    dst.lst.accepting_machines = True  # let it take another, as a fresh listener would
    c = socket.create_connection(("127.0.0.1", dst.addr.port))
    c.sendall(bytes(recorded[:200_000]))
    time.sleep(0.5)
    c.close()
    time.sleep(0.3)
    assert any("did not verify" in line for line in dst.logs), dst.logs
    assert len(dst.built) == 1
    dst.close()


def relay(a: socket.socket, b: socket.socket, keep: bytearray | None) -> None:
    """Copy a to b until a ends (keeping the bytes in `keep`), then end b."""
    try:
        while data := a.recv(1 << 16):
            if keep is not None:
                keep += data
            b.sendall(data)
    except OSError:
        pass
    try:
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def test_plaintext_peer_against_tls_listener(pki: dict[str, Security]) -> None:
    dst = Dst(pki["b"])
    src = source()
    with pytest.raises(ConnectionLost):
        send(src, dst, Security(key=None))
    assert src.running and not dst.built
    time.sleep(0.3)
    assert any("TLS" in line for line in dst.logs), dst.logs
    dst.close()


def test_tls_peer_from_another_ca(pki: dict[str, Security]) -> None:
    dst = Dst(pki["b"])
    src = source()
    with pytest.raises((AuthError, ConnectionLost)):
        send(src, dst, pki["evil"])
    assert src.running and not dst.built
    dst.close()


def test_idle_connections_do_not_block_the_listener() -> None:
    dst = Dst(Security(key=KEY), hello_timeout=1.0)
    idle = [socket.create_connection(("127.0.0.1", dst.addr.port)) for _ in range(10)]
    src = source()
    before = src.memory.pages.copy()
    t = time.monotonic()
    send(src, dst, Security(key=KEY))
    assert_moved(src, before, dst.result())
    assert time.monotonic() - t < 10  # not behind the idle ones, one after another
    for c in idle:
        assert c.recv(1) == b""  # each was closed after its hello deadline
    dst.close()


def test_too_many_pending_connections_drop_the_oldest() -> None:
    """Past max_pending in their hello, the oldest idle ones go, and a real source gets in."""
    dst = Dst(Security(key=KEY), hello_timeout=30.0, max_pending=4)
    idle = [socket.create_connection(("127.0.0.1", dst.addr.port)) for _ in range(8)]
    time.sleep(0.3)
    assert sum("still in its hello" in line for line in dst.logs) == 4, dst.logs
    for c in idle[:4]:
        c.settimeout(5)
        assert c.recv(1) == b""  # the four oldest were dropped
    src = source()
    before = src.memory.pages.copy()
    send(src, dst, Security(key=KEY))
    assert_moved(src, before, dst.result())
    for c in idle:
        c.close()
    dst.close()


def test_return_connection_for_unknown_session_is_refused(pki: dict[str, Security]) -> None:
    dst = Dst(Security(key=KEY))
    from livemig.migration import handshake, hello
    chan = dial(dst.addr, Security(key=KEY), Role.RETURN)
    h = hello.Hello(encodings=["zero", "raw"], role="return", session=b"x" * 16)
    handshake.client(chan, h, Security(key=KEY), time.monotonic() + 5)
    with pytest.raises((ConnectionLost, RemoteError)):
        chan.read(time.monotonic() + 5)
    dst.close()


# -- faults at the switch-over: stalls, a lost COMMIT, a lost RUNNING (issue 8) ----------------


class StallProxy:
    """Relays one session's connections; once `armed`, stops forwarding in `direction`
    ("forward": source to destination, "back": the answers) for `seconds`."""

    def __init__(self, target: Address, direction: str, seconds: float) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.addr = Address("127.0.0.1", self.srv.getsockname()[1])
        self.target, self.direction, self.seconds = target, direction, seconds
        self.armed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.srv.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target.port))
            threading.Thread(target=self._pump, args=(a, b, "forward"), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, "back"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(1 << 16):
                if self.armed.is_set() and direction == self.direction:
                    self.armed.clear()  # one stall, as long as `seconds`
                    time.sleep(self.seconds)
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.mark.parametrize("direction", ["forward", "back"])
def test_stalled_link_does_not_hold_the_guest_paused(direction: str) -> None:
    """A 10 s stall after the pause: the source gives up at its switch-over limit (1 s here),
    resumes, and the destination discards its copy (defect 4)."""
    dst = Dst(Security(key=KEY))
    proxy = StallProxy(dst.addr, direction, 10)
    src = source(64 << 20)
    real_pause = src.pause
    paused_at: list[float] = []

    def pause_and_stall() -> None:
        real_pause()
        paused_at.append(time.monotonic())
        proxy.armed.set()

    src.pause = pause_and_stall  # type: ignore[method-assign]
    sec = Security(key=KEY)
    opts = MigrationOptions(mode=__import__("livemig.migration").migration.Mode.STOP_COPY,
                            switchover_timeout_s=1.0)
    main = dial(proxy.addr, sec)
    with pytest.raises(ConnectionLost, match="switch-over did not finish"):
        migrate(src, main, opts, security=sec)
    main.close()
    paused_for = time.monotonic() - paused_at[0]
    assert src.running and paused_for < 5, paused_for  # not the 10 s of the stall
    res = dst.result(timeout=30)
    assert res.machine is None and res.error is not None
    assert dst.built[0].closed and not dst.built[0].started
    dst.close()


def test_lost_commit_is_resolved_and_the_source_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    """COMMIT never arrives: the source asks; the destination, which never got it, gives its
    copy up and says so; the source resumes (defect 6)."""
    from livemig.migration import source as source_mod
    from livemig.migration.wire import RecordType

    real_send = source_mod.Source.send

    def lose_commit(self: Any, rtype: RecordType, *parts: Any) -> int:
        return 0 if rtype is RecordType.COMMIT else real_send(self, rtype, *parts)

    monkeypatch.setattr(source_mod.Source, "send", lose_commit)
    dst = Dst(Security(key=KEY))
    src = source(8 << 20)
    with pytest.raises(MigrationError, match="never reached the destination"):
        send(src, dst, Security(key=KEY), commit_timeout_s=1.0)
    assert src.running
    res = dst.result()
    assert res.machine is None and "discarded its copy" in str(res.error)
    assert dst.built[0].closed and not dst.built[0].started
    wait_for(lambda: any("never received" in line for line in dst.logs), 5,
             f"the listener to log the resolve: {dst.logs}")
    dst.close()


def test_lost_running_is_resolved_and_the_source_stays_paused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """COMMIT arrives but RUNNING is lost: the source asks, hears that the machine runs at
    the destination, and completes without resuming."""
    from livemig.migration import destination as dest_mod
    from livemig.migration.wire import RecordType

    real_send = dest_mod.Destination._send

    def lose_running(self: Any, rtype: RecordType, *parts: Any) -> None:
        if rtype not in (RecordType.RUNNING, RecordType.REPORT):
            real_send(self, rtype, *parts)

    monkeypatch.setattr(dest_mod.Destination, "_send", lose_running)
    dst = Dst(Security(key=KEY))
    src = source(8 << 20)
    stats = send(src, dst, Security(key=KEY), commit_timeout_s=1.0)
    assert stats.status == "completed" and not src.running
    res = dst.result()
    assert res.error is None and res.machine is not None and res.machine.started
    dst.close()


def test_migration_over_a_unix_socket(tmp_path: Path) -> None:
    """Same host: a unix socket channel (mode 0600), authenticated like TCP."""
    sec = Security(key=KEY)
    srv = bind(Address(path=str(tmp_path / "mig.sock")))
    assert (tmp_path / "mig.sock").stat().st_mode & 0o777 == 0o600
    built: list[MemoryMachine] = []

    def build(cfg: Any) -> MemoryMachine:
        built.append(MemoryMachine(cfg))
        return built[-1]

    lst = Listener(srv, sec, build)
    lst.start()
    src = source()
    before = src.memory.pages.copy()
    addr = Address(path=str(tmp_path / "mig.sock"))
    stats = migrate(src, dial(addr, sec), MigrationOptions(verify_memory=True), security=sec)
    assert stats.channels["main"]["kind"] == "unix"
    assert_moved(src, before, lst.results.get(timeout=20))
    lst.close()


def test_unix_channel_carries_file_descriptors() -> None:
    """SCM_RIGHTS: the fd of a RAM memfd crosses, and both sides see the same memory."""
    import mmap
    import os

    from livemig.migration.channels import SocketChannel

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = SocketChannel(a), SocketChannel(b)
    fd = os.memfd_create("livemig-test")
    os.ftruncate(fd, 4096)
    os.pwrite(fd, b"shared page", 0)
    left.send_fds(b"ram", [fd])
    data, fds = right.recv_fds(16, 4)
    assert data == b"ram" and len(fds) == 1
    with mmap.mmap(fds[0], 4096) as m:
        assert m[:11] == b"shared page"
        m[:4] = b"SEEN"
    assert os.pread(fd, 4, 0) == b"SEEN"
    for f in (fd, *fds):
        os.close(f)
    left.close()
    right.close()


@pytest.mark.parametrize("kind", ["psk", "tls"])
@pytest.mark.parametrize("mode", ["precopy", "stop-copy"])
def test_page_streams(kind: str, mode: str, pki: dict[str, Security]) -> None:
    """--streams 4: batches on four page connections, placed in order, with a writer."""
    from test_migrate_engine import Guest

    from livemig.migration import Mode

    sec = Security(key=KEY) if kind == "psk" else pki["a"]
    dst = Dst(Security(key=KEY) if kind == "psk" else pki["b"])
    src = source(32 << 20)
    g = Guest(src, np.arange(0, len(src.memory.pages), 3))
    time.sleep(0.05)
    stats = send(src, dst, sec, streams=4, mode=Mode(mode))
    g.stop.set()
    res = dst.result()
    assert res.error is None and res.machine is not None, res.error
    assert np.array_equal(res.machine.memory.pages, src.memory.pages)
    assert stats.verified_memory
    assert {f"pages-{i}" for i in range(4)} <= set(stats.channels)
    assert all(stats.channels[f"pages-{i}"]["bytes_sent"] > 0 for i in range(4))
    dst.close()


def test_page_streams_need_the_listener() -> None:
    """A bare `receive` (no listener to take extra connections) refuses page streams."""
    from test_migrate_engine import Dest, connect
    d = Dest()
    src = source(8 << 20)
    with pytest.raises(MigrationError):
        migrate(src, connect(d.addr), MigrationOptions(streams=2),
                redial=lambda role: dial(Address("127.0.0.1", d.addr[1]), Security(), role))
    d.join()
    assert src.running


def test_return_connection_that_beats_the_registration(pki: dict[str, Security],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS: the source dials its RETURN connection right after WELCOME; the listener may
    not have registered the migration yet (a race seen once in a bench run): it waits."""
    from livemig.migration import listener as listener_mod

    class SlowActive(listener_mod._Active):
        def __init__(self, *args: Any, **kw: Any) -> None:
            time.sleep(0.5)  # the main connection's thread is slow to register its migration
            super().__init__(*args, **kw)

    monkeypatch.setattr(listener_mod, "_Active", SlowActive)
    dst = Dst(pki["b"])
    src = source()
    before = src.memory.pages.copy()
    send(src, dst, pki["a"])
    assert_moved(src, before, dst.result())
    dst.close()
