"""One livemig migration of a workload, measured: two machine processes on loopback.

The destination is a `livemig listen` process, the source a `livemig run` process booting the
guest image; once the guest has warmed up, `livemig migrate --json` moves it and its report is
the result. The guest must then go on heartbeating on the destination, counters continuing.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livemig.control import request
from livemig.images import guest_image

LIVEMIG = [sys.executable, "-m", "livemig"]


class ScenarioError(RuntimeError):
    """The scenario could not be run (a process failed to start, the guest never booted)."""


@dataclass
class LivemigScenario:
    """A workload and how to migrate it."""

    workload: str = "hotset"
    mem: str = "1G"
    vcpus: int = 1
    cmdline: str = "wss=100M"
    mode: str = "precopy"
    migrate_args: list[str] = field(default_factory=list)
    warmup_heartbeats: int = 3
    settle_heartbeats: int = 3
    timeout_s: float = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(sock: str) -> dict[str, Any] | None:
    try:
        return request(sock, "status", timeout=5)
    except Exception:
        return None


def _last_hb(sock: str) -> int:
    st = _status(sock)
    if not st or not st.get("ok") or st["probe"]["last_heartbeat"] is None:
        return -1
    return int(st["probe"]["last_heartbeat"]["value"])


def _wait(pred: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        for p in procs:
            if p.poll() is not None:
                raise ScenarioError(f"{what}: a machine process exited ({p.args!r})")
        time.sleep(0.05)
    raise ScenarioError(f"timed out waiting for {what}")


def run_livemig(sc: LivemigScenario) -> dict[str, Any]:
    """Run the scenario once; the result is `livemig migrate --json` plus heartbeat evidence."""
    work = Path(tempfile.mkdtemp(prefix="livemig-bench-"))
    src, dst = str(work / "src.sock"), str(work / "dst.sock")
    port = _free_port()
    logs = [open(work / n, "wb") for n in ("dst.log", "src.log")]  # noqa: SIM115
    procs = [
        subprocess.Popen([*LIVEMIG, "listen", "--host", "127.0.0.1", "--port", str(port),
                          "--once", "--control", dst, "--console", str(work / "dst.console")],
                         stdout=logs[0], stderr=subprocess.STDOUT),
        subprocess.Popen([*LIVEMIG, "run", guest_image(sc.workload), "--mem", sc.mem,
                          "--vcpus", str(sc.vcpus), "--append", sc.cmdline, "--control", src,
                          "--console", str(work / "src.console")],
                         stdout=logs[1], stderr=subprocess.STDOUT),
    ]
    try:
        _wait(lambda: _last_hb(src) >= sc.warmup_heartbeats, 60, "the guest to warm up", procs)
        _wait(lambda: b"listening" in (work / "dst.log").read_bytes(), 30,
              "the destination to listen", procs)
        res = subprocess.run([*LIVEMIG, "migrate", src, "--to", f"127.0.0.1:{port}", "--mode",
                              sc.mode, "--json", *sc.migrate_args],
                             capture_output=True, text=True, timeout=sc.timeout_s)
        if res.returncode != 0 and not res.stdout.strip():
            raise ScenarioError(f"livemig migrate failed: {res.stderr.strip()}")
        result: dict[str, Any] = json.loads(res.stdout)
        if result.get("status") == "completed":
            before = _last_hb(dst)
            _wait(lambda: _last_hb(dst) >= before + sc.settle_heartbeats, 30,
                  "heartbeats on the destination", procs[:1])
            st = _status(dst) or {}
            result["heartbeats"] = {"dest_last": _last_hb(dst),
                                    "dest_failures": st.get("probe", {}).get("counts", {})
                                    .get("fail")}
        result["bytes_per_s"] = result.get("bandwidth")
        return result
    finally:
        for sock in (src, dst):
            with contextlib.suppress(Exception):
                request(sock, "quit", timeout=5)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
        subprocess.run(["rm", "-rf", str(work)], check=False)
