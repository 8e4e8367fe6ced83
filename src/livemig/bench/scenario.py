"""One livemig migration of a workload, measured: two machine processes on loopback.

The destination is a `livemig listen` process, the source a `livemig run` process booting the
guest image; once the guest has warmed up, `livemig migrate --json` moves it and its report is
the result. The guest must then go on heartbeating on the destination, counters continuing.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass, field
from typing import Any

from livemig.bench.pair import MigrationPair, PairError
from livemig.control import request
from livemig.images import guest_image


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
    auth: str = "psk"  # how the pair authenticates (bench.pair.AUTH_KINDS)
    # Where the two sides run (bench.netns.Network): command prefixes and the listen address.
    dst_host: str = "127.0.0.1"
    src_prefix: list[str] = field(default_factory=list)
    dst_prefix: list[str] = field(default_factory=list)
    dst_args: list[str] = field(default_factory=list)  # more `livemig listen` options


def run_livemig(sc: LivemigScenario) -> dict[str, Any]:
    """Run the scenario once; the result is `livemig migrate --json` plus heartbeat evidence.

    A migration still running after ``timeout_s`` is cancelled and raises `ScenarioError`.
    """
    try:
        with MigrationPair(guest_image(sc.workload), sc.mem, sc.vcpus, sc.cmdline,
                           dst_host=sc.dst_host, src_prefix=sc.src_prefix,
                           dst_prefix=sc.dst_prefix, auth=sc.auth,
                           dst_args=sc.dst_args) as pair:
            return _measure(pair, sc)
    except PairError as e:
        raise ScenarioError(str(e)) from e


def _measure(pair: MigrationPair, sc: LivemigScenario) -> dict[str, Any]:
    pair.wait(lambda: pair.heartbeat(pair.src_sock) >= sc.warmup_heartbeats, 60,
              "the guest to warm up")
    try:
        res = pair.migrate(["--mode", sc.mode, "--json", *sc.migrate_args], capture=True,
                           timeout=sc.timeout_s)
    except subprocess.TimeoutExpired as e:
        with contextlib.suppress(Exception):
            request(pair.src_sock, "migrate-cancel", timeout=5)
        raise ScenarioError(f"livemig migrate did not finish within {sc.timeout_s:.0f} s "
                            "(cancelled)") from e
    if res.returncode != 0 and not res.stdout.strip():
        raise ScenarioError(f"livemig migrate failed: {res.stderr.strip()}")
    result: dict[str, Any] = json.loads(res.stdout)
    if result.get("status") == "completed":
        before = pair.heartbeat(pair.dst_sock)
        pair.wait(lambda: pair.heartbeat(pair.dst_sock) >= before + sc.settle_heartbeats, 30,
                  "heartbeats on the destination", alive=[pair.dst])
        st = pair.status(pair.dst_sock) or {}
        result["heartbeats"] = {"dest_last": pair.heartbeat(pair.dst_sock),
                                "dest_failures": st.get("probe", {}).get("counts", {})
                                .get("fail")}
    result["bytes_per_s"] = result.get("bandwidth")
    return result
