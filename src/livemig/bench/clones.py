"""`livemig bench templates`: N clones of one template migrated at once, TLM against generic.

A template is taken from an `idle` guest whose memory holds `fill` bytes of data (and, for
the "busy" workload, that writes `touch` random pages a second among the first `touchset`
bytes of it: a small working set). For each N, N clones
of it run (`livemig run --template`), then all migrate at once to N `livemig listen`
processes on this host: with TLM (`--mode tlm`, each destination holding a copy of the
template in its `--templates` directory) and generically (pre-copy to plain listeners). Per
group: total time (first migration asked to last one ended), downtime, bytes and pages sent,
and the memory of the sources and of the destinations once the clones run there: the sum of
the processes' PSS (`smaps_rollup`), the PSS of their guest RAM alone, and MemAvailable.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from livemig.bench.footprint import mem_available, ram_own, ram_pss, resident, rollup_pss
from livemig.bench.procs import LIVEMIG, Proc, Procs
from livemig.images import guest_image
from livemig.migration import templates

METHODS = ("tlm", "generic")
SETTLE_S = 1.0  # after machines start or arrive, before memory is read


@dataclass
class ClonesSettings:
    counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    mem: str = "512M"
    fill: str = "300M"
    # workload name: what the idle guest's command line adds to fill=
    workloads: dict[str, str] = field(
        default_factory=lambda: {"idle": "", "busy": "touch=200 touchset=16M"})
    vs_qemu: bool = False  # also QEMU migrating N ordinary guests at once


def _template(procs: Procs, s: ClonesSettings, extra: str, name: str) -> templates.Template:
    src = procs.machine(f"{name}-src", ["run", guest_image("idle"), "--mem", s.mem,
                                        "--append", f"fill={s.fill} {extra}".strip()])
    path = procs.work / f"{name}-template"
    res = subprocess.run([*LIVEMIG, "template", "save", src.control, str(path)],
                         capture_output=True, text=True, timeout=300)
    procs.stop(src)
    if res.returncode != 0:
        raise RuntimeError(f"template save failed: {res.stderr.strip()}")
    return templates.load(path)


def _held(procs: Procs, t: templates.Template, name: str) -> Path:
    """A templates directory for the destinations, holding a copy of `t` (another file: the
    destinations share no page cache with the sources)."""
    d = procs.work / f"{name}-held"
    d.mkdir()
    subprocess.run(["cp", "-r", "--sparse=always", str(t.path), str(d / "t")], check=True)
    return d


def _memory(ps: list[Proc], template_file: Path | None) -> dict[str, int]:
    """The processes' PSS, their guest RAM's PSS, and the guest-RAM footprint: each one's own
    RAM pages plus the template's page cache once (when they map one)."""
    own = sum(ram_own(p.pid) for p in ps)
    cache = resident(template_file) if template_file is not None else 0
    return {"pss": sum(rollup_pss(p.pid) for p in ps), "ram_pss": sum(ram_pss(p.pid) for p in ps),
            "ram_own": own, "template_cache": cache, "footprint": own + cache}


def one_group(procs: Procs, t: templates.Template, held: Path, n: int, method: str,
              tag: str) -> dict[str, Any]:
    """N clones of `t` migrated at once with `method`; the figures of the group."""
    before = mem_available()
    clones = [procs.machine(f"{tag}-c{i}", ["run", "--template", str(t.path)])
              for i in range(n)]
    extra = ("--templates", str(held)) if method == "tlm" else ()
    dsts = [procs.listener(f"{tag}-d{i}", extra) for i in range(n)]
    time.sleep(SETTLE_S)
    # Busy clones diverge from their template as they run: their memory is read right before
    # they migrate, the destinations' right after.
    src_mem, with_sources = _memory(clones, t.memory_path), mem_available()
    t0 = time.monotonic()
    for c, d in zip(clones, dsts, strict=True):
        procs.start_migration(c, d, "tlm" if method == "tlm" else "precopy")
    stats = procs.finish_migrations(clones)
    total_ms = (max(s["done_s"] for s in stats) - t0) * 1000
    held_file = held / "t" / templates.MEMORY if method == "tlm" else None
    dst_mem = _memory(dsts, held_file)
    for c in clones:
        c.popen.wait(30)
    time.sleep(SETTLE_S)
    after = mem_available()
    for d in dsts:
        procs.stop(d)
    return {
        "clones": n, "method": method, "total_ms": round(total_ms, 1),
        "downtime_ms_max": round(max(s["downtime_ms"] for s in stats), 1),
        "downtime_ms_mean": round(sum(s["downtime_ms"] for s in stats) / n, 1),
        "bytes_sent": sum(s["bytes_sent"] for s in stats),
        "pages_sent": sum(sum(s["pages"].values()) for s in stats),
        "events": sorted({e["event"] for s in stats for e in s["events"]
                          if e["event"].startswith("tlm:")}),
        "source": src_mem, "destination": dst_mem,
        "mem_available": {"before": before, "sources_running": with_sources,
                          "after_migration": after},
    }


def qemu_group(s: ClonesSettings, extra: str, n: int) -> dict[str, Any]:
    """QEMU migrating N ordinary guests of the same size and data at once (each its own
    pair of QEMU processes over loopback; the N start together once all have booted)."""
    from concurrent.futures import ThreadPoolExecutor

    from livemig.bench.qemu import QemuMigrationConfig, run_qemu_migration

    cfg = QemuMigrationConfig(guest_image("idle"), f"fill={s.fill} {extra}".strip(), s.mem)
    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        rs = [f.result().to_dict() for f in [pool.submit(run_qemu_migration, cfg)
                                               for _ in range(n)]]
    bad = [r for r in rs if r["status"] != "completed"]
    if bad:
        raise RuntimeError(f"QEMU migration {bad[0]['status']}: {bad[0].get('error')}")
    return {"clones": n, "method": "qemu", "total_ms": round(max(r["total_ms"] for r in rs), 1),
            "downtime_ms_max": round(max(r["downtime_ms"] for r in rs), 1),
            "downtime_ms_mean": round(sum(r["downtime_ms"] for r in rs) / n, 1),
            "bytes_sent": sum(r["bytes_sent"] for r in rs),
            "pages_sent": sum(sum(r["pages"].values()) for r in rs), "events": [],
            "wall_s": round(time.monotonic() - t0, 1), "source": None, "destination": None,
            "mem_available": None}


def run_clones_bench(s: ClonesSettings, say: Callable[[str], None]) -> dict[str, Any]:
    """Every workload, every N, both methods; returns the rows and the goals' verdicts."""
    rows: list[dict[str, Any]] = []
    for workload, extra in s.workloads.items():
        procs = Procs(f"livemig-bench-tpl-{workload}-")
        try:
            t = _template(procs, s, extra, workload)
            say(f"{workload}: template {t.content_id[:16]} with {t.data_pages} data pages")
            held = _held(procs, t, workload)
            for n in s.counts:
                for method in METHODS:
                    r = one_group(procs, t, held, n, method, f"{workload}-{method}-{n}")
                    r |= {"workload": workload, "template_pages": t.data_pages}
                    rows.append(r)
                    say(f"{workload} N={n} {method:7s}: total {r['total_ms']:.0f} ms, downtime "
                        f"max {r['downtime_ms_max']:.0f} ms, {r['bytes_sent'] / 2**20:.1f} MiB, "
                        f"dst RAM footprint {r['destination']['footprint'] / 2**20:.0f} MiB "
                        f"(src {r['source']['footprint'] / 2**20:.0f} MiB)")
                if s.vs_qemu:
                    q = qemu_group(s, extra, n) | {"workload": workload}
                    rows.append(q)
                    say(f"{workload} N={n} qemu   : total {q['total_ms']:.0f} ms (longest), "
                        f"downtime max {q['downtime_ms_max']:.0f} ms, "
                        f"{q['bytes_sent'] / 2**20:.1f} MiB")
        finally:
            procs.close()
    return {"settings": asdict(s), "rows": rows, "goals": goals(rows)}


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals at the largest N of each workload: TLM bytes <= 0.15x and total
    <= 0.3x generic; TLM destination footprint <= 1.05x the sources' (guest RAM: own pages
    plus the template's page cache once; the processes' PSS is shown beside it)."""
    out = []
    for workload in sorted({r["workload"] for r in rows}):
        n = max(r["clones"] for r in rows if r["workload"] == workload)
        by = {r["method"]: r for r in rows if r["workload"] == workload and r["clones"] == n}
        if not set(METHODS) <= set(by):
            continue
        tlm, gen = by["tlm"], by["generic"]
        checks = [
            ("bytes TLM/generic", tlm["bytes_sent"] / max(gen["bytes_sent"], 1), 0.15),
            ("total TLM/generic", tlm["total_ms"] / max(gen["total_ms"], 1e-9), 0.3),
            ("dst/src RAM footprint (TLM)", tlm["destination"]["footprint"]
             / max(tlm["source"]["footprint"], 1), 1.05),
            ("dst/src process PSS (TLM; whole processes, not a goal)",
             tlm["destination"]["pss"] / max(tlm["source"]["pss"], 1), None),
        ]
        out += [{"workload": workload, "clones": n, "what": w, "ratio": round(v, 3),
                 "goal": g, "met": None if g is None else v <= g} for w, v, g in checks]
    return out


def print_clones(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="templates: N clones migrated at once, TLM vs generic pre-copy (RAM: own "
              "pages + template page cache once; PSS: smaps_rollup of the processes; MiB)")
    for col in ("load", "N", "method", "total ms", "down max ms", "MiB sent", "pages",
                "src RAM MiB", "dst RAM MiB", "src PSS", "dst PSS", "avail drop"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        mem = ["-"] * 5
        if r["source"] is not None:
            drop = r["mem_available"]["before"] - r["mem_available"]["after_migration"]
            mem = [_mib(r["source"]["footprint"]), _mib(r["destination"]["footprint"]),
                   _mib(r["source"]["pss"]), _mib(r["destination"]["pss"]), _mib(drop)]
        t.add_row(r["workload"], str(r["clones"]), r["method"], f"{r['total_ms']:.0f}",
                  f"{r['downtime_ms_max']:.0f}", f"{r['bytes_sent'] / 2**20:.1f}",
                  str(r["pages_sent"]), *mem)
    c = Console()
    c.print(t)
    print_goals(c, result["goals"])


def print_goals(c: Any, gs: list[dict[str, Any]]) -> None:
    for g in gs:
        verdict = ("" if g["goal"] is None
                   else f" (goal <= {g['goal']}) {'met' if g['met'] else 'NOT MET'}")
        c.print(f"{g.get('workload', '')} N={g.get('clones', '')} {g['what']}: "
                f"{g['ratio']}{verdict}")


def _mib(b: int) -> str:
    return f"{b / 2**20:.0f}"


def plot_clones(result: dict[str, Any], path: str) -> None:
    """Bytes, total time and destination RAM PSS against N, TLM and generic, per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for (key, label, scale), ax in zip(
            [("bytes_sent", "MiB sent", 2**20), ("total_ms", "total time (ms)", 1),
             ("dst_ram", "destination RAM footprint (MiB)", 2**20)], axes, strict=True):
        for workload in sorted({r["workload"] for r in result["rows"]}):
            for method in METHODS:
                rs = [r for r in result["rows"]
                      if r["workload"] == workload and r["method"] == method
                      and r["destination"] is not None]
                ys = [(r["destination"]["footprint"] if key == "dst_ram" else r[key]) / scale
                      for r in rs]
                ax.plot([r["clones"] for r in rs], ys, marker="o", label=f"{method} {workload}")
        ax.set_xlabel("clones migrated at once")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
