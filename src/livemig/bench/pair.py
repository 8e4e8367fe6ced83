"""Two machine processes for one migration: a `livemig listen` destination and a `livemig run`
source, each optionally inside a network namespace. Used by the demo and the benchmarks."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from livemig.control import request
from livemig.migration.credentials import make_tls_dir, write_key

AUTH_KINDS = ("psk", "tls", "psk+tls", "none")

LIVEMIG = [sys.executable, "-m", "livemig"]


class PairError(RuntimeError):
    """A machine process failed to start or a wait timed out; the message says which."""


class MigrationPair:
    """Starts the destination, then the source; `close()` (or `with`) stops both.

    `auth` chooses how the two authenticate: a pre-shared key made for the pair (`psk`, the
    default), mutual TLS from a CA made for the pair (`tls`), both, or `none` (--insecure)."""

    def __init__(self, image: str, mem: str, vcpus: int, cmdline: str, arch: str = "x86_64",
                 dst_host: str = "127.0.0.1", src_prefix: list[str] | None = None,
                 dst_prefix: list[str] | None = None, auth: str = "psk",
                 src_args: list[str] | None = None, dst_args: list[str] | None = None) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="livemig-pair-"))
        self.src_auth, self.dst_auth = self._credentials(auth)
        self.src_sock, self.dst_sock = str(self.work / "src.sock"), str(self.work / "dst.sock")
        self.src_console, self.dst_console = self.work / "src.console", self.work / "dst.console"
        self.src_prefix = src_prefix or []
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self._start(image, mem, vcpus, cmdline, arch, dst_host, dst_prefix or [],
                        src_args or [], dst_args or [])
        except BaseException:
            self.close()
            raise

    def _start(self, image: str, mem: str, vcpus: int, cmdline: str, arch: str, dst_host: str,
               dst_prefix: list[str], src_args: list[str], dst_args: list[str]) -> None:
        """`src_args` / `dst_args`: more options of `run` / `listen` (such as `--net`)."""
        self.dst = self._spawn([*dst_prefix, *LIVEMIG, "listen", "--host", dst_host,
                                "--port", "0", "--once", *self.dst_auth, *dst_args,
                                "--control", self.dst_sock,
                                "--console", str(self.dst_console)], "dst.log")
        self.target = f"{dst_host}:{self._listening_port()}"
        self.src = self._spawn([*self.src_prefix, *LIVEMIG, "run", image, "--arch", arch,
                                "--mem", mem, "--vcpus", str(vcpus), "--append", cmdline,
                                *src_args, "--control", self.src_sock, "--console",
                                str(self.src_console)], "src.log")

    def _credentials(self, auth: str) -> tuple[list[str], list[str]]:
        """Make the pair's key or TLS directories; the options for each side."""
        if auth not in AUTH_KINDS:
            raise PairError(f"auth must be one of {', '.join(AUTH_KINDS)}, not {auth!r}")
        if auth == "none":
            return ["--insecure"], ["--insecure"]
        src: list[str] = []
        dst: list[str] = []
        if "psk" in auth:
            write_key(str(self.work / "key"))
            src += ["--key-file", str(self.work / "key")]
            dst += ["--key-file", str(self.work / "key")]
        if "tls" in auth:
            for side, opts in (("src", src), ("dst", dst)):
                make_tls_dir(str(self.work / f"tls-{side}"), ca_dir=str(self.work / "ca"))
                opts += ["--tls-dir", str(self.work / f"tls-{side}")]
        return src, dst

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.work / log, "wb") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def _listening_port(self) -> int:
        log = self.work / "dst.log"
        found: list[int] = []

        def port() -> bool:
            m = re.search(rb"listening for a migration on \S+:(\d+)", log.read_bytes())
            if m:
                found.append(int(m.group(1)))
            return bool(m)
        self.wait(port, 30, "the destination to listen")
        return found[0]

    def wait(self, pred: Callable[[], Any], timeout: float, what: str,
             alive: list[subprocess.Popen[bytes]] | None = None) -> None:
        """Poll `pred` until true; PairError on timeout or when one of the `alive` processes
        (default: both) died meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            for p in self.procs if alive is None else alive:
                if p.poll() is not None:
                    raise PairError(f"waiting for {what}: a machine process exited "
                                    f"({self.log_tail(p)})")
            time.sleep(0.05)
        raise PairError(f"timed out after {timeout:.0f}s waiting for {what}")

    def log_tail(self, p: subprocess.Popen[bytes]) -> str:
        name = "dst.log" if p is self.dst else "src.log"
        lines = (self.work / name).read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    @staticmethod
    def status(sock: str) -> dict[str, Any] | None:
        try:
            reply = request(sock, "status", timeout=5)
        except Exception:
            return None
        return reply if reply.get("ok") else None

    def heartbeat(self, sock: str) -> int:
        """Last heartbeat value of the machine behind `sock`, -1 when none (yet)."""
        st = self.status(sock)
        last = st["probe"]["last_heartbeat"] if st else None
        return -1 if last is None else int(last["value"])

    def migrate(self, args: list[str], capture: bool, timeout: float = 600) -> \
            subprocess.CompletedProcess[str]:
        """Run `livemig migrate SOURCE --to DEST ARGS` next to the source."""
        cmd = [*self.src_prefix, *LIVEMIG, "migrate", self.src_sock, "--to", self.target,
               *self.src_auth, *args]
        return subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout)

    def close(self) -> None:
        for sock in (self.src_sock, self.dst_sock):
            with contextlib.suppress(Exception):
                request(sock, "quit", timeout=5)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> MigrationPair:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
