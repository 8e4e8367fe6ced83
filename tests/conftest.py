"""Shared test helpers: real guests on real KVM, machine processes and their control sockets."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests" / "build"
LIVEMIG = [sys.executable, "-m", "livemig"]


def _make_key() -> str:
    """One pre-shared key for the whole test run (listen and migrate refuse to run without)."""
    import tempfile

    from livemig.migration.credentials import write_key

    path = os.path.join(tempfile.mkdtemp(prefix="livemig-test-key-"), "key")
    write_key(path)
    return path


KEY_FILE = _make_key()
AUTH = ["--key-file", KEY_FILE]


def kvm_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


needs_kvm = pytest.mark.skipif(not kvm_usable(),
                               reason="/dev/kvm is absent or not permitted: KVM guests cannot run")


def image(name: str) -> str:
    path = GUESTS / f"{name}.elf"
    assert path.is_file(), f"guest image {path} missing: run `make -C guests`"
    return str(path)


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class MachineProcess:
    """A `livemig` subcommand hosting a machine, with its control socket and console file."""

    def __init__(self, args: list[str], tmp: Path, name: str,
                 prefix: tuple[str, ...] | list[str] = ()) -> None:
        self.control = str(tmp / f"{name}.sock")
        self.console = tmp / f"{name}.console"
        self.log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(  # prefix: e.g. `ip netns exec NS`
            [*prefix, *LIVEMIG, *args, "--control", self.control, "--console",
             str(self.console)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for(lambda: os.path.exists(self.control) or self.proc.poll() is not None,
                 30, f"{name} control socket")
        if self.proc.poll() is not None:
            raise AssertionError(f"{name} exited: {(tmp / f'{name}.log').read_text()}")

    def ctl(self, cmd: str, **kw: Any) -> dict[str, Any]:
        from livemig.control import request
        return request(self.control, cmd, **kw)

    def heartbeat(self) -> int:
        """Value of the last heartbeat, -1 before the first."""
        last = self.ctl("status")["probe"]["last_heartbeat"]
        return -1 if last is None else int(last["value"])

    def failures(self) -> int:
        return int(self.ctl("status")["probe"]["counts"]["fail"])

    def wait_heartbeat_above(self, value: int, timeout: float = 20.0) -> int:
        return int(wait_for(lambda: (h := self.heartbeat()) > value and h, timeout,
                            f"heartbeat above {value}"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ctl("quit")
            except Exception:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Callable[..., MachineProcess]]:
    """Start machine processes; all are stopped at the end of the test."""
    started: list[MachineProcess] = []

    def start(args: list[str], name: str = "m",
              prefix: tuple[str, ...] | list[str] = ()) -> MachineProcess:
        mp = MachineProcess(args, tmp_path, name, prefix)
        started.append(mp)
        return mp
    yield start
    for mp in started:
        mp.stop()


# A `verify` guest's pass takes ~0.7 s at this rate on one vCPU of a nested host, ~7 s at the
# default 20000 (each checked page then also rewrites up to 8): for tests that need a guest
# that checks its memory and writes some, not a high dirty rate.
VERIFY_QUICK = "wss=4M rate=500"


def running_verify(machines: Callable[..., MachineProcess]) -> MachineProcess:
    """A `verify` machine process named `src` (256M, one vCPU), after its first clean pass."""
    src = machines(["run", image("verify"), "--mem", "256M", "--append", VERIFY_QUICK], "src")
    wait_for(lambda: src.ctl("status")["probe"]["counts"]["ok"] >= 1, 30, "a first verify pass")
    return src


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIVEMIG, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


_LISTENERS: list[Listener] = []


@pytest.fixture(autouse=True)
def _stop_listeners() -> Iterator[None]:
    """A test that fails before stopping its `livemig listen` must not leave it running
    (a `--once` listener waits on after a refused hello)."""
    yield
    while _LISTENERS:
        lst = _LISTENERS.pop()
        if lst.proc.poll() is None:
            lst.proc.kill()
            lst.proc.communicate(timeout=10)


class Listener:
    """A `livemig listen --once` process on loopback; its port is read from what it prints."""

    def __init__(self, tmp: Path, console: Path | None = None, name: str = "dst",
                 auth: list[str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.control = str(tmp / f"{name}.sock")
        self.console = console
        self.proc = subprocess.Popen(
            [*LIVEMIG, "listen", "--host", "127.0.0.1", "--port", "0", "--once",
             *(AUTH if auth is None else auth), *args,
             "--console", str(console) if console else "none", "--control", self.control],
            stderr=subprocess.PIPE, text=True, cwd=ROOT)
        _LISTENERS.append(self)
        assert self.proc.stderr is not None
        self.said: list[str] = []  # what it printed before its port
        for line in iter(self.proc.stderr.readline, ""):
            if m := re.search(r"listening for a migration on .*:(\d+)\s*$", line):
                self.port = int(m.group(1))
                break
            self.said.append(line)
        else:
            raise AssertionError(f"listen did not say its port: {''.join(self.said)}")

    def ctl(self, cmd: str, **kw: Any) -> dict[str, Any]:
        from livemig.control import request
        return request(self.control, cmd, **kw)

    def terminate(self) -> str:
        """Stop it now (it may still be listening); its remaining output."""
        self.proc.terminate()
        return self.stop()

    def stop(self) -> str:
        """Its remaining output; with --once it exits by itself after a refused migration."""
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        return err


def future_version_destination() -> tuple[str, int]:
    """A destination that answers any HELLO with protocol version 99; its address."""
    import threading

    from livemig.migration import hello, wire

    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        c, _ = srv.accept()
        wire.RecordReader(c).read()
        answer = hello.Hello(min_version=99, max_version=99, encodings=["raw", "zero"])
        wire.send_record(c, wire.RecordType.WELCOME, answer.encode())
        time.sleep(1)
        c.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[:2]


def migrate_verify_guest(machines: Callable[..., MachineProcess], tmp: Path,
                         *flags: str, guest: str = "verify", mem: str = "256M",
                         cmdline: str = "wss=4M rate=2000",
                         verify_memory: bool = True, listen_args: tuple[str, ...] = (),
                         listener_said: list[str] | None = None) -> dict[str, Any]:
    """Migrate a live `verify` guest (256M, wss=4M; or another that reports OK) with
    `livemig migrate FLAGS --verify-memory --json` to a `livemig listen`; check it completed,
    verified (unless `verify_memory` is false: then the guest's own checks alone judge), and
    that the guest passes again at the destination. Returns the stats; `listener_said` gets
    what the listener printed (its options: `listen_args`)."""
    import json

    src = machines(["run", image(guest), "--mem", mem, "--vcpus", "2",
                    "--append", cmdline], "src")
    # `verify` reports OK after each clean pass; `cpustate` checks registers all the time and
    # reports only heartbeats (and FAIL on a mismatch).
    count = "ok" if guest == "verify" else "heartbeat"
    wait_for(lambda: src.ctl("status")["probe"]["counts"][count] >= 1, 30, f"a first {guest} pass")
    dst = Listener(tmp, args=listen_args)
    try:
        check = ["--verify-memory"] if verify_memory else []
        res = run_cli("migrate", src.control, "--to", f"127.0.0.1:{dst.port}", *AUTH, *flags,
                      *check, "--json", timeout=120)
        assert res.returncode == 0, res.stderr
        stats: dict[str, Any] = json.loads(res.stdout)
        assert stats["status"] == "completed", stats
        assert stats["verified_memory"] is (True if verify_memory else None), stats
        assert stats["error"] is None
        oks = dst.ctl("status")["probe"]["counts"][count]
        wait_for(lambda: dst.ctl("status")["probe"]["counts"][count] > oks, 30,
                 f"a {guest} pass at the destination")
        status = dst.ctl("status")
        assert status["state"] == "running" and status["error"] is None, status
        assert status["probe"]["counts"]["fail"] == 0, status["probe"]
        dst.ctl("quit")
    finally:
        out = dst.stop()
        if listener_said is not None:
            listener_said.extend([*dst.said, out])
    return stats
