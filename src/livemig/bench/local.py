"""`livemig bench local`: same-host handover against a loopback TCP migration.

An `idle` guest whose memory holds a quarter of its RAM size of data (the "busy" workload
also writes `touch` random pages of it a second) migrates to a new `livemig listen` on this
host: by handover (`--to unix:PATH`: RAM passed as memfds, only state sent) and by pre-copy
over loopback TCP. Per run: downtime, total time, bytes sent, and the host's MemAvailable at
seed 002's five moments: before the source starts, with it running, with the destination
listening, with both present (the least seen during the migration and right at its end) and
once the source is gone. With `vs_qemu`, QEMU migrating the same guest on this host with
x-ignore-shared, RAM on a shared file in /dev/shm (only "before" and "both present" are read
there: QEMU's processes start inside its baseline's run).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from livemig.bench.clones import print_goals
from livemig.bench.footprint import mem_available
from livemig.bench.procs import Procs
from livemig.images import guest_image
from livemig.units import parse_size

METHODS = ("handover", "tcp")
SETTLE_S = 1.0


@dataclass
class LocalSettings:
    sizes: list[str] = field(default_factory=lambda: ["1G", "4G"])
    workloads: dict[str, int] = field(default_factory=lambda: {"idle": 0, "busy": 5000})
    repeat: int = 3
    vs_qemu: bool = False  # QEMU with x-ignore-shared on a shared memory backend too


class _LowWater:
    """The least MemAvailable seen while running (sampled every few milliseconds)."""

    def __init__(self) -> None:
        self.low = mem_available()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.low = min(self.low, mem_available())

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return min(self.low, mem_available())


def one_local(procs: Procs, size: str, touch: int, method: str, tag: str) -> dict[str, Any]:
    fill = parse_size(size) // 4
    moments = {"before": mem_available()}
    src = procs.machine(f"{tag}-src", ["run", guest_image("idle"), "--mem", size,
                                       "--append", f"fill={fill} touch={touch}"])
    time.sleep(SETTLE_S)
    moments["running"] = mem_available()
    dst = procs.listener(f"{tag}-dst", unix=method == "handover")
    time.sleep(SETTLE_S)
    moments["destination_listening"] = mem_available()
    low = _LowWater()
    procs.start_migration(src, dst, "handover" if method == "handover" else "precopy")
    stats = procs.finish_migrations([src])[0]
    moments["both_present"] = low.stop()
    src.popen.wait(30)
    time.sleep(SETTLE_S)
    moments["source_gone"] = mem_available()
    st = dst.status()
    if not st or st["state"] != "running":
        raise RuntimeError(f"{tag}: the machine does not run at the destination ({st})")
    procs.stop(dst)
    return {"size": size, "method": method, "downtime_ms": stats["downtime_ms"],
            "total_ms": stats["total_ms"], "guest_gap_ms": stats["guest_gap_ms"],
            "bytes_sent": stats["bytes_sent"],
            "pages_sent": sum(stats["pages"].values()),
            "switchover_ms": stats.get("switchover_ms"), "mem_available": moments}


def one_qemu(size: str, touch: int) -> dict[str, Any]:
    """QEMU's same-host migration of the same guest: RAM on a shared file in /dev/shm,
    x-ignore-shared on both sides (only device state is sent)."""
    from livemig.bench.qemu import QemuMigrationConfig, run_qemu_migration

    fill = parse_size(size) // 4
    shm = Path(tempfile.mkdtemp(prefix="livemig-qemu-shm-", dir="/dev/shm"))
    moments = {"before": mem_available()}
    low = _LowWater()
    try:
        cfg = QemuMigrationConfig(
            guest_image("idle"), f"fill={fill} touch={touch}", size, ignore_shared=True,
            extra_args=["-object", f"memory-backend-file,id=ram0,size={size},"
                        f"mem-path={shm / 'ram'},share=on", "-machine", "memory-backend=ram0"])
        q = run_qemu_migration(cfg).to_dict()
    finally:
        moments["both_present"] = low.stop()
        shutil.rmtree(shm, ignore_errors=True)
    if q["status"] != "completed":
        raise RuntimeError(f"QEMU x-ignore-shared migration {q['status']}: {q.get('error')}")
    return {"size": size, "method": "qemu-ignore-shared", "downtime_ms": q["downtime_ms"],
            "total_ms": q["total_ms"], "guest_gap_ms": q["guest_gap_ms"],
            "bytes_sent": q["bytes_sent"], "pages_sent": sum(q["pages"].values()),
            "switchover_ms": None, "mem_available": moments}


def run_local_bench(s: LocalSettings, say: Callable[[str], None]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    procs = Procs("livemig-bench-local-")
    try:
        for size in s.sizes:
            for workload, touch in s.workloads.items():
                for method in (*METHODS, *(["qemu-ignore-shared"] if s.vs_qemu else [])):
                    for i in range(s.repeat):
                        r = (one_qemu(size, touch) if method == "qemu-ignore-shared" else
                             one_local(procs, size, touch, method,
                                       f"{size}-{workload}-{method}-{i}"))
                        r |= {"workload": workload, "run": i + 1}
                        rows.append(r)
                        m = r["mem_available"]
                        drop = ("-" if "destination_listening" not in m else
                                f"{(m['destination_listening'] - m['both_present']) >> 20}")
                        say(f"{size} {workload} {method:8s} run {i + 1}: downtime "
                            f"{r['downtime_ms']:.1f} ms, total {r['total_ms']:.0f} ms, "
                            f"{r['bytes_sent']:,} bytes, MemAvailable drop while both "
                            f"present {drop} MiB")
    finally:
        procs.close()
    return {"settings": asdict(s), "rows": rows, "goals": goals(rows)}


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goal: handover of the largest idle machine, downtime <= 10 ms (median)."""
    idle = [r for r in rows if r["method"] == "handover" and r["workload"] == "idle"]
    if not idle:
        return []
    big = max(parse_size(r["size"]) for r in idle)
    ds = sorted(r["downtime_ms"] for r in idle if parse_size(r["size"]) == big)
    med = ds[len(ds) // 2]
    return [{"workload": "idle", "clones": "-", "what": f"handover downtime ms, {big >> 30} GiB "
             f"(median of {len(ds)})", "ratio": round(med, 2), "goal": 10.0, "met": med <= 10}]


def print_local(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="local: same-host handover vs loopback TCP pre-copy (MemAvailable in MiB)")
    for col in ("size", "workload", "method", "run", "downtime ms", "total ms", "bytes sent",
                "before", "running", "dst listening", "both present", "source gone"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        m = r["mem_available"]
        t.add_row(r["size"], r["workload"], r["method"], str(r["run"]),
                  f"{r['downtime_ms']:.1f}", f"{r['total_ms']:.0f}", f"{r['bytes_sent']:,}",
                  *(f"{m[k] / 2**20:.0f}" if k in m else "-"
                    for k in ("before", "running", "destination_listening", "both_present",
                              "source_gone")))
    c = Console()
    c.print(t)
    print_goals(c, result["goals"])


def plot_local(result: dict[str, Any], path: str) -> None:
    """Downtime and MemAvailable at the five moments, per size and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4))
    keys = ("before", "running", "destination_listening", "both_present", "source_gone")
    seen: set[tuple[str, str, str]] = set()
    for r in result["rows"]:
        k = (r["size"], r["workload"], r["method"])
        if k in seen:
            continue
        seen.add(k)
        a.bar(f"{r['size']}\n{r['workload']}\n{r['method']}", r["downtime_ms"])
        if all(x in r["mem_available"] for x in keys):
            b.plot(range(len(keys)), [r["mem_available"][x] / 2**20 for x in keys],
                   marker="o", label=" ".join(k))
    a.set_ylabel("downtime (ms), first run")
    b.set_xticks(range(len(keys)), [x.replace("_", "\n") for x in keys])
    b.set_ylabel("host MemAvailable (MiB)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
