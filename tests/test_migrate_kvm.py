"""Live migrations of real guests on KVM, source and destination in one process on loopback.

Each guest must go on reporting at the destination, its counters continuing, and
--verify-memory must pass. Skipped only where /dev/kvm is absent.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import pytest

from livemig.contract import Arch, MachineConfig
from livemig.migration import (
    Cancelled,
    MigrationError,
    MigrationOptions,
    Mode,
    RemoteError,
    migrate,
    receive,
)
from livemig.probe import ProbeKind

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm (KVM guests)"
)

GUESTS = {
    "verify": (1 << 30, "wss=4M rate=1000"),  # this host emulates guest code: keep passes short
    "cpustate": (256 << 20, ""),
    "hotset": (1 << 30, "wss=256M"),
    "idle": (256 << 20, ""),
}


def kvm(cfg: MachineConfig) -> Any:
    from livemig.machine import KvmMachine

    return KvmMachine(cfg)


def boot(guest: str) -> Any:
    mem, cmdline = GUESTS[guest]
    image = os.path.join(ROOT, "guests", "build", f"{guest}.elf")
    m = kvm(MachineConfig(Arch.X86_64, mem, 2, image, cmdline))
    m.start()
    deadline = time.monotonic() + 30  # a loaded nested host boots slowly
    while m.probe.counts[ProbeKind.HEARTBEAT] < 2:
        if time.monotonic() > deadline or m.error:
            m.close()  # a stuck guest must not load the machine for the tests after it
            pytest.fail(f"{guest} never sent a heartbeat: {m.error}")
        time.sleep(0.02)
    return m


class Dest:
    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.machine: Any = None
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        c, _ = self.srv.accept()
        try:
            self.machine, _ = receive(c, kvm)
        except Exception as e:
            self.error = e
        finally:
            c.close()

    def connect(self) -> socket.socket:
        return socket.create_connection(self.srv.getsockname())


def last_beat(m: Any) -> int:
    ev = m.probe.last(ProbeKind.HEARTBEAT)
    return ev.value if ev else -1


def healthy_for(m: Any, seconds: float) -> None:
    """The guest keeps heartbeating (a new beat within `seconds` + 10 s: a loaded nested host
    runs guests slowly) and reports no failure."""
    start = last_beat(m)
    time.sleep(seconds)
    deadline = time.monotonic() + 10
    while last_beat(m) <= start and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m.error is None, m.error
    assert m.probe.first_failure is None, m.probe.first_failure
    assert last_beat(m) > start


@pytest.mark.parametrize("mode", [Mode.PRECOPY, Mode.STOP_COPY])
@pytest.mark.parametrize("guest", list(GUESTS))
def test_live_migration(guest: str, mode: Mode) -> None:
    src = boot(guest)
    d = Dest()
    try:
        stats = migrate(src, d.connect(), MigrationOptions(mode=mode, verify_memory=True))
        before = last_beat(src)
        d.thread.join(30)
        assert d.error is None, d.error
        assert stats.status == "completed" and stats.verified_memory
        assert not src.running
        healthy_for(d.machine, 1.0)
        assert last_beat(d.machine) > before  # the counter continues, it did not restart
        assert d.machine.probe.counts[ProbeKind.BOOT] == 0
        assert stats.guest_gap_ms is not None
    finally:
        src.close()
        if d.machine is not None:
            d.machine.close()


def test_hotset_auto_converge_under_low_bandwidth() -> None:
    src = boot("hotset")
    d = Dest()
    opts = MigrationOptions(max_bandwidth=200e6, auto_converge=True, verify_memory=True,
                            max_rounds=40)
    try:
        stats = migrate(src, d.connect(), opts)
        d.thread.join(30)
        assert d.error is None and stats.status == "completed"
        assert stats.throttle >= 0.2
        assert stats.to_json()["throttle"] == stats.throttle
        healthy_for(d.machine, 0.5)
    finally:
        src.close()
        if d.machine is not None:
            d.machine.close()


def test_cancel_leaves_source_running() -> None:
    src = boot("hotset")
    d = Dest()
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    try:
        with pytest.raises(Cancelled):
            migrate(src, d.connect(), MigrationOptions(max_bandwidth=100e6), cancel=cancel)
        d.thread.join(10)
        assert isinstance(d.error, RemoteError)
        assert src.running
        healthy_for(src, 0.5)
    finally:
        src.close()


def test_connection_cut_leaves_source_running() -> None:
    src = boot("hotset")
    d = Dest()
    sock = d.connect()
    threading.Timer(0.3, lambda: sock.shutdown(socket.SHUT_RDWR)).start()
    try:
        with pytest.raises(MigrationError):
            migrate(src, sock, MigrationOptions(max_bandwidth=100e6))
        assert src.running
        healthy_for(src, 0.5)
    finally:
        src.close()
