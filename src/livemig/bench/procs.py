"""Machine processes for the multi-machine benchmarks: `livemig run` sources (or clones),
`livemig listen` destinations and `livemig migrate` runs started together, all on this host
with one pre-shared key, every one stopped by `close()`."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livemig.control import request
from livemig.migration.credentials import write_key

LIVEMIG = [sys.executable, "-m", "livemig"]


class ProcsError(RuntimeError):
    """A machine process failed to start or a wait timed out; the message says which."""


@dataclass
class Proc:
    """One process: its Popen, its control socket, its log."""

    name: str
    popen: subprocess.Popen[bytes]
    control: str
    log: Path
    target: str = ""  # a listener's address (HOST:PORT or unix:PATH)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def status(self) -> dict[str, Any] | None:
        try:
            reply = request(self.control, "status", timeout=5)
        except Exception:
            return None
        return reply if reply.get("ok") else None

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"


class Procs:
    """A working directory, a key, and the processes started in it."""

    def __init__(self, prefix: str) -> None:
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        self.key = str(self.work / "key")
        write_key(self.key)
        self.auth = ["--key-file", self.key]
        self.procs: list[Proc] = []

    def _spawn(self, name: str, args: list[str]) -> Proc:
        log = self.work / f"{name}.log"
        control = str(self.work / f"{name}.sock")
        with open(log, "wb") as f:
            p = subprocess.Popen([*LIVEMIG, *args, "--control", control, "--console", "none"],
                                 stdout=f, stderr=subprocess.STDOUT)
        proc = Proc(name, p, control, log)
        self.procs.append(proc)
        return proc

    def wait(self, pred: Callable[[], Any], timeout: float, what: str, proc: Proc) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if v := pred():
                return v
            if proc.popen.poll() is not None:
                raise ProcsError(f"waiting for {what}: {proc.name} exited ({proc.tail()})")
            time.sleep(0.05)
        raise ProcsError(f"timed out after {timeout:.0f}s waiting for {what}")

    def machine(self, name: str, args: list[str], timeout: float = 120) -> Proc:
        """`livemig ARGS` hosting a machine (run, run --template), once it sent a heartbeat."""
        p = self._spawn(name, args)

        def beating() -> bool:
            st = p.status()
            return bool(st and st["probe"]["last_heartbeat"])
        self.wait(beating, timeout, f"a heartbeat from {name}", p)
        return p

    def listener(self, name: str, extra: tuple[str, ...] = (), unix: bool = False) -> Proc:
        """`livemig listen --once` on loopback TCP (or a unix socket), once it listens."""
        where = (["--unix", str(self.work / f"{name}.mig")] if unix
                 else ["--host", "127.0.0.1", "--port", "0"])
        p = self._spawn(name, ["listen", *where, "--once", *self.auth, *extra])

        def address() -> str | None:
            m = re.search(r"listening for a migration on (\S+)", p.log.read_text())
            return m.group(1) if m else None
        p.target = self.wait(address, 30, f"{name} to listen", p)
        return p

    def start_migration(self, src: Proc, dst: Proc, mode: str, **opts: Any) -> None:
        """Ask the source, on its control socket, to migrate to `dst` (as `livemig migrate`
        does, without a process of its own: several start at once without start-up costs)."""
        reply = request(src.control, "migrate", to=dst.target, mode=mode, key_file=self.key,
                        **opts)
        if not reply.get("ok"):
            raise ProcsError(f"{src.name}: migrate refused: {reply.get('error')}")

    def finish_migrations(self, srcs: list[Proc], timeout: float = 900) -> list[dict[str, Any]]:
        """Wait for the sources' migrations to end; their stats, with `done_s` (monotonic
        time each was seen to end). ProcsError if one did not complete."""
        out: list[dict[str, Any] | None] = [None] * len(srcs)
        deadline = time.monotonic() + timeout
        while any(o is None for o in out):
            if time.monotonic() > deadline:
                raise ProcsError("timed out waiting for the migrations to end")
            for i, src in enumerate(srcs):
                if out[i] is not None:
                    continue
                q = request(src.control, "query-migrate", timeout=10)
                if q.get("status") in ("setup", "active"):
                    continue
                if q.get("status") != "completed" or not q.get("stats"):
                    raise ProcsError(f"{src.name}: migration {q.get('status')}: "
                                     f"{q.get('error')}")
                out[i] = q["stats"] | {"done_s": time.monotonic()}
            time.sleep(0.01)
        return [o for o in out if o is not None]

    def stop(self, p: Proc) -> None:
        with contextlib.suppress(Exception):
            request(p.control, "quit", timeout=5)
        try:
            p.popen.wait(15)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()

    def close(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                self.stop(p)
        self.procs.clear()
        shutil.rmtree(self.work, ignore_errors=True)
