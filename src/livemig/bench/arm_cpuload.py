"""Host CPU load per core in the thesis' four states (seed 000, section 8.6, Figs 8-28..8-32).

The thesis showed, qualitatively, the load of its Raspberry Pi host with Xvisor booted, a guest
booted, the guest running counters, and during a migration. Here the same four states on the
ARMv8 board, measured from /proc/stat per core over a sampling window, plus the CPU time of
livemig's own processes (source `livemig run`, destination `livemig listen`, the `livemig
migrate` client) over the same window:

1. board booted: the board process with its guest paused (vCPU threads parked) and a
   destination listening;
2. guest booted: the `idle` guest running (WFI between 50 timer interrupts/s);
3. guest running: the `cpustate` guest (register rounds, flat out);
4. during migration: `cpustate` migrated live (pre-copy) to the destination; the window is the
   migration's own duration.

The per-core figures are the whole host's (other work on the host shows in them); the livemig
figure is what its processes used, in % of one core, in total and per core (each thread's CPU
time put on the core it was last seen on, sampled every 20 ms).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from livemig.bench.pair import LIVEMIG, MigrationPair, PairError
from livemig.contract import Arch
from livemig.control import request
from livemig.images import guest_image

_TICK = os.sysconf("SC_CLK_TCK")


class LoadError(Exception):
    """The measurement could not run; the message is for the user."""


def core_jiffies() -> list[tuple[int, int]]:
    """(busy, total) jiffies of every core, from /proc/stat."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            parts = line.split()
            if parts[0].startswith("cpu") and parts[0] != "cpu":
                v = [int(x) for x in parts[1:9]]
                idle = v[3] + v[4]
                out.append((sum(v) - idle, sum(v)))
    return out


def process_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def thread_cpu(pids: list[int]) -> dict[int, tuple[int, int]]:
    """Per thread of `pids`: (user + system jiffies, the core it last ran on)."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(tid)] = (int(fields[11]) + int(fields[12]), int(fields[36]))
    return out


class CoreAttribution:
    """livemig's CPU per core: every SAMPLE_S, each thread's new CPU time is put on the core
    it last ran on (/proc/PID/task/TID/stat); an estimate, as exact as the sampling."""

    SAMPLE_S = 0.02

    def __init__(self, pids: list[int], cores: int) -> None:
        self.jiffies = [0] * cores
        self._pids = pids
        self._last = thread_cpu(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.SAMPLE_S):
            now = thread_cpu(self._pids)
            for tid, (used, core) in now.items():
                before = self._last.get(tid, (used, core))[0]
                if 0 <= core < len(self.jiffies):
                    self.jiffies[core] += used - before
            self._last = now

    def add(self, pid: int) -> None:
        """Count a process started after the window opened."""
        self._pids = [*self._pids, pid]

    def close(self) -> list[int]:
        self._stop.set()
        self._thread.join()
        return self.jiffies


@dataclass
class Window:
    """A sampling window over the host's cores and some named processes."""

    pids: dict[str, int]

    def __post_init__(self) -> None:
        self.t0 = time.monotonic()
        self.cores0 = core_jiffies()
        self.procs0 = {n: process_seconds(p) for n, p in self.pids.items()}
        self.attribution = CoreAttribution(list(self.pids.values()), len(self.cores0))

    def close(self, ended: dict[str, float] | None = None) -> dict[str, Any]:
        """Loads since the start; `ended` = CPU seconds of processes that ended meanwhile."""
        elapsed = time.monotonic() - self.t0
        mine = self.attribution.close()
        cores = core_jiffies()
        per = [100.0 * (b1 - b0) / max(1, t1 - t0)
               for (b0, t0), (b1, t1) in zip(self.cores0, cores, strict=True)]
        busy = sum(b1 - b0 for (b0, _), (b1, _) in zip(self.cores0, cores, strict=True))
        total = sum(t1 - t0 for (_, t0), (_, t1) in zip(self.cores0, cores, strict=True))
        used = {n: process_seconds(p) - self.procs0[n] for n, p in self.pids.items()}
        used.update(ended or {})
        pct = {n: 100.0 * v / max(elapsed, 1e-9) for n, v in used.items()}
        return {"seconds": elapsed, "per_core_pct": per, "host_pct": 100.0 * busy / max(1, total),
                "livemig_pct": sum(pct.values()), "by_process_pct": pct,
                "livemig_per_core_pct": [100.0 * j / _TICK / max(elapsed, 1e-9) for j in mine]}


def _heartbeats(sock: str) -> int:
    return int(request(sock, "status", timeout=5)["probe"]["counts"]["heartbeat"])


def _pids(pair: MigrationPair) -> dict[str, int]:
    return {"source": pair.src.pid, "destination": pair.dst.pid}


def _sample(pair: MigrationPair, seconds: float, name: str, guest: str) -> dict[str, Any]:
    hb0 = _heartbeats(pair.src_sock)
    w = Window(_pids(pair))
    time.sleep(seconds)
    res = w.close()
    rate = (_heartbeats(pair.src_sock) - hb0) / res["seconds"]
    return {"state": name, "guest": guest, "heartbeats_per_s": rate, **res}


def _migrate(pair: MigrationPair) -> dict[str, Any]:
    """State 4: the window is the `livemig migrate` client's life."""
    cmd = [*LIVEMIG, "migrate", pair.src_sock, "--to", pair.target, *pair.src_auth]
    w = Window(_pids(pair))
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        w.attribution.add(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        res = w.close({"migrate client": usage.ru_utime + usage.ru_stime})
        if proc.returncode != 0:
            err.seek(0)
            raise LoadError(f"the migration failed: {err.read().decode().strip()[-300:]}")
    return {"state": "during migration", "guest": "cpustate, migrating",
            "heartbeats_per_s": None, **res}


def _started(pair: MigrationPair) -> None:
    pair.wait(lambda: pair.heartbeat(pair.src_sock) >= 2, 60, "the guest's heartbeats")


def run(seconds: float, mem: int, vcpus: int) -> dict[str, Any]:
    """The four states, in order; the JSON report."""
    mem_text = f"{mem >> 20}M"
    states: list[dict[str, Any]] = []
    try:
        with MigrationPair(guest_image("idle", Arch.ARM64), mem_text, vcpus, "tick=20",
                           arch="arm64") as pair:
            _started(pair)
            request(pair.src_sock, "pause", timeout=10)
            time.sleep(0.2)
            states.append(_sample(pair, seconds, "board booted", "idle, paused"))
            request(pair.src_sock, "resume", timeout=10)
            time.sleep(0.2)
            states.append(_sample(pair, seconds, "guest booted", "idle"))
        with MigrationPair(guest_image("cpustate", Arch.ARM64), mem_text, vcpus, "hb=50",
                           arch="arm64") as pair:
            _started(pair)
            states.append(_sample(pair, seconds, "guest running", "cpustate"))
            states.append(_migrate(pair))
    except PairError as e:
        raise LoadError(str(e)) from e
    return {"benchmark": "cpu-load", "cores": len(core_jiffies()), "vcpus": vcpus,
            "mem_size": mem, "seconds_per_state": seconds, "states": states}


def plot(report: dict[str, Any], path: str) -> None:
    """Grouped bars: per state, one bar per core and one for livemig's processes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = report["states"]
    cores = report["cores"]
    width = 0.8 / (cores + 1)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    xs = range(len(states))
    for c in range(cores):
        ax.bar([x + c * width for x in xs], [s["per_core_pct"][c] for s in states], width,
               label=f"host cpu{c}", alpha=0.35, color=f"C{c}")
        ax.bar([x + c * width for x in xs], [s["livemig_per_core_pct"][c] for s in states],
               width * 0.6, label=f"livemig on cpu{c}", color=f"C{c}")
    ax.bar([x + cores * width for x in xs], [s["livemig_pct"] for s in states], width,
           label="livemig total (% of one core)", color="black", alpha=0.7)
    ax.set_xticks([x + cores * width / 2 for x in xs], [s["state"] for s in states])
    ax.set_ylabel("CPU load (%)")
    ax.set_title(f"Host CPU load in the thesis' four states (ARM board, {report['vcpus']} vCPUs)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=cores + 1,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
