"""The pre-copy scenario grid: livemig and QEMU on the same guest and settings, a row each.

Every row names one livemig configuration (`livemig migrate` options) and the QEMU
configuration that does the same thing (QMP capabilities and parameters, see
`qemu.migration_settings`), the workload, its RAM and the network both run on. `run_grid` runs
each row `repeat` times, livemig, QEMU and the raw socket copy interleaved so that noise hits
every side alike, and builds one report per row (`report.build_report`, medians) with the
runs kept under ``runs``.

A row never stops the grid: whatever fails (a machine that does not boot, a migration that
times out, a QEMU build without a feature, a network that cannot be made here) becomes that
side's result ``{"status": "error" | "unsupported" | "timeout", "error": why}``, and the grid
goes on with the next row.

Bytes: ``bytes_sent`` is each side's own count (livemig: every record on every channel; QEMU:
``ram.transferred``, which counts multifd pages before compression). Where the run's network
has a counter (`netns.Network`), ``link_bytes`` is what crossed the link, the same way for
both sides.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from livemig.bench import loadedcopy, netns, rawcopy, report
from livemig.bench.qemu import (
    QemuError,
    QemuMigrationConfig,
    QemuNotFoundError,
    QemuUnsupportedError,
    run_qemu_migration,
)
from livemig.bench.scenario import LivemigScenario, ScenarioError, run_livemig
from livemig.images import guest_image

GiB = 1 << 30
# Rows whose throughput goal gets the second yardstick, the raw copy beside a running guest.
LOADED_COPY_ROWS = ("default", "plain", "plain-prealloc")
LINK_RATE = "1gbit"
LINK_RAW_COPY_BYTES = 256 << 20  # the yardstick's size on the shaped link (~2 s at 1 Gbit)


@dataclass(frozen=True)
class Row:
    """One scenario of the grid."""

    name: str
    title: str
    livemig_args: tuple[str, ...] = ()
    qemu: dict[str, Any] = field(default_factory=dict)  # QemuMigrationConfig fields
    mode: str = "precopy"  # livemig's --mode
    workload: str = "hotset"
    mem: int | None = None  # bytes; None: the grid's --mem
    link: str | None = None  # None: loopback; else a tc rate on a netns veth pair
    max_downtime_ms: float | None = None  # None: the grid's --max-downtime
    cmdline: str | None = None  # the guest's; None: the grid's `wss=` for hotset, else none
    # The destination allocates its RAM before the migration on both sides (livemig `listen
    # --prealloc`, QEMU `-mem-prealloc`), as the raw copy allocates its buffers untimed.
    prealloc: bool = False


@dataclass
class GridSettings:
    """What every row shares (the command's options)."""

    mem: int = GiB
    wss: str = "100M"
    vcpus: int = 1
    repeat: int = 1
    max_downtime_ms: float = 300.0
    xbzrle_cache: int = 64 << 20
    auth: str = "psk"
    timeout_s: float = 120.0  # each livemig / QEMU migration
    netns: bool = True  # loopback rows in a private namespace (link bytes counted) when root
    vs_qemu: bool = True  # run QEMU's side of every row
    raw_copy: bool = True  # measure the raw socket copy after each repeat


def dense_cmdline(mem: int) -> str:
    """The `plain` row's hotset: a 4 MiB hot loop, and three quarters of RAM written once at
    boot and never again (``coldrate=0``), every page of it non-zero."""
    return f"hot=4M cold={(mem * 3 // 4) >> 20}M coldrate=0"


def grid_rows(settings: GridSettings) -> list[Row]:
    """Every row, in the order the grid runs them."""
    cache = settings.xbzrle_cache
    return [
        Row("default", "default settings"),
        # The default row's bytes/total mixes the pipeline's rate with the hot set's rounds;
        # here nearly every byte is a page that must cross once, so bytes/total is the rate of
        # a plain migration (default settings) over a guest's RAM.
        Row("plain", "default settings, dense guest (3/4 of RAM written once, 4 MiB hot)",
            cmdline=dense_cmdline(settings.mem)),
        # The same with the destination's RAM allocated before the migration (timed on neither
        # side), as the raw copy's buffers are: the pipeline's rate without the host's cost of
        # first touching fresh memory (see rampool.py).
        Row("plain-prealloc", "the plain row, destination RAM allocated ahead (listen "
            "--prealloc vs -mem-prealloc)", cmdline=dense_cmdline(settings.mem), prealloc=True),
        Row("streams2", "--streams 2 vs multifd, 2 channels", ("--streams", "2"),
            {"multifd_channels": 2}),
        Row("streams4", "--streams 4 vs multifd, 4 channels", ("--streams", "4"),
            {"multifd_channels": 4}),
        Row("xbzrle", f"--xbzrle vs xbzrle, cache {cache >> 20} MiB on both",
            ("--xbzrle", "--xbzrle-cache", str(cache)), {"xbzrle_cache_size": cache}),
        Row("zstd", "--compress zstd vs multifd (1 channel) zstd", ("--compress", "zstd"),
            {"multifd_channels": 1, "multifd_compression": "zstd"}),
        Row("auto-converge", "--auto-converge vs auto-converge, 10 ms downtime limit",
            ("--auto-converge",), {"auto_converge": True}, max_downtime_ms=10.0),
        Row("idle-1g", "idle guest, 1 GiB", workload="idle", mem=GiB),
        Row("idle-4g", "idle guest, 4 GiB", workload="idle", mem=4 * GiB),
        Row(f"zstd-{LINK_RATE}", f"--compress zstd vs multifd (1 channel) zstd, {LINK_RATE} "
            "netns link", ("--compress", "zstd"),
            {"multifd_channels": 1, "multifd_compression": "zstd"}, link=LINK_RATE),
    ]


ROW_NAMES = tuple(r.name for r in grid_rows(GridSettings()))


def parse_rows(text: str, known: Sequence[str] = ROW_NAMES) -> list[str]:
    """Row names from ``a,b,c`` (order kept, repeats dropped); ValueError (one line) for an
    unknown or missing name (of ``known``: the grid's rows by default)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--rows names no row (rows: {', '.join(known)})")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown row{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(n) for n in unknown)} (rows: {', '.join(known)})")
    return list(dict.fromkeys(names))


def _one_line(e: BaseException | str) -> str:
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__ if isinstance(e, BaseException) else "unknown error"
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def failed(status: str, why: BaseException | str) -> dict[str, Any]:
    """A side's result when it could not run or finish: its status and why, one line."""
    return {"status": status, "error": _one_line(why)}


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


class _Networks:
    """The grid's networks, made once on first use and removed at the end.

    A network that cannot be made is remembered with its reason; its rows say why."""

    def __init__(self, stack: contextlib.ExitStack, use_netns: bool) -> None:
        self.stack = stack
        self.use_netns = use_netns
        self.made: dict[str | None, netns.Network | str] = {}

    def get(self, link: str | None) -> netns.Network | str:
        if link not in self.made:
            self.made[link] = self._make(link)
        return self.made[link]

    def _make(self, link: str | None) -> netns.Network | str:
        try:
            if link is not None:
                return self.stack.enter_context(netns.shaped_link(link))
            if self.use_netns and netns.can_make_namespaces() is None:
                return self.stack.enter_context(netns.private_loopback())
            return self.stack.enter_context(netns.host_loopback())
        except netns.NetworkError as e:
            where = f"a {link} netns link" if link else "a private loopback namespace"
            if link is None:  # loopback rows can still run on the host's own loopback
                return self.stack.enter_context(netns.host_loopback())
            return f"cannot set up {where}: {_one_line(e)}"


@dataclass
class Yardstick:
    """One raw-copy figure over a row's repeats: the rates (bytes/s), and why any failed."""

    rates: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, value: float | str) -> str:
        """Keep one measurement (a rate, or why there is none); its text for the run's line."""
        if isinstance(value, str):
            self.errors.append(value)
            return value
        self.rates.append(value)
        return f"{value / 2**20:.0f} MiB/s"

    def median(self) -> float | None:
        return sorted(self.rates)[len(self.rates) // 2] if self.rates else None


def _counted(net: netns.Network, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one side; add the bytes that crossed the network's link meanwhile."""
    before = net.link_bytes()
    r = run()
    after = net.link_bytes()
    if before is not None and after is not None and r.get("status") not in ("error",
                                                                             "unsupported"):
        r["link_bytes"] = after - before
    return r


def guest_cmdline(row: Row, s: GridSettings) -> str:
    """The guest command line of a row (the same on both sides)."""
    if row.cmdline is not None:
        return row.cmdline
    return f"wss={s.wss}" if row.workload == "hotset" else ""


def _livemig(row: Row, s: GridSettings, net: netns.Network) -> dict[str, Any]:
    mem = row.mem or s.mem
    downtime = row.max_downtime_ms if row.max_downtime_ms is not None else s.max_downtime_ms
    cmdline = guest_cmdline(row, s)
    sc = LivemigScenario(row.workload, f"{mem >> 20}M", s.vcpus, cmdline, row.mode,
                         ["--max-downtime", str(downtime), *row.livemig_args],
                         timeout_s=s.timeout_s, auth=s.auth, dst_host=net.dst_host,
                         src_prefix=net.src_prefix, dst_prefix=net.dst_prefix,
                         dst_args=["--prealloc", str(mem)] if row.prealloc else [])
    try:
        return run_livemig(sc)
    except ScenarioError as e:
        status = "timeout" if "did not finish" in str(e) else "error"
        return failed(status, e)
    except Exception as e:  # the grid goes on whatever one run did
        return failed("error", f"{type(e).__name__}: {_one_line(e)}")


def _qemu(row: Row, s: GridSettings, net: netns.Network) -> dict[str, Any]:
    mem = row.mem or s.mem
    downtime = row.max_downtime_ms if row.max_downtime_ms is not None else s.max_downtime_ms
    cmdline = guest_cmdline(row, s)
    fields: dict[str, Any] = {"downtime_limit_ms": int(downtime), **row.qemu}
    try:
        cfg = QemuMigrationConfig(guest_image(row.workload), cmdline, mem, smp=s.vcpus,
                                  migrate_timeout_s=s.timeout_s, src_prefix=net.src_prefix,
                                  dst_prefix=net.dst_prefix, listen_host=net.dst_host,
                                  dst_args=["-mem-prealloc"] if row.prealloc else [], **fields)
        return run_qemu_migration(cfg).to_dict()
    except QemuUnsupportedError as e:
        return failed("unsupported", e)
    except QemuNotFoundError as e:
        return failed("unavailable", e)
    except QemuError as e:
        return failed("error", e)
    except Exception as e:
        return failed("error", f"{type(e).__name__}: {_one_line(e)}")


def _raw_copy(row: Row, s: GridSettings, net: netns.Network) -> float | str:
    """The yardstick on the row's network (bytes/s), or why it could not be measured."""
    try:
        if net.src_prefix or net.dst_prefix:
            nbytes = LINK_RAW_COPY_BYTES if row.link else s.mem
            return rawcopy.measure_raw_copy_from(net.src_prefix, nbytes, net.dst_host,
                                                 net.dst_prefix).bytes_per_s
        return rawcopy.measure_raw_copy(s.mem, repeats=1).bytes_per_s
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
        return _one_line(e)


def _raw_copy_beside_guest(row: Row, s: GridSettings, net: netns.Network) -> float | str:
    """The yardstick again with the row's guest running on this host (`loadedcopy`)."""
    return loadedcopy.beside_guest(str(guest_image(row.workload)), row.mem or s.mem,
                                   guest_cmdline(row, s), lambda: _raw_copy(row, s, net))


def memory_short(mem: int, meminfo: str = "/proc/meminfo") -> str | None:
    """Why a guest of ``mem`` bytes does not fit this host now (one machine at a time runs
    with its destination, which fills only what it receives; 1 GiB kept for the rest), or
    None when it fits (or the host does not say)."""
    try:
        with open(meminfo) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        avail = int(fields["MemAvailable"].split()[0]) << 10
    except (OSError, KeyError, ValueError):
        return None
    if mem + GiB <= avail:
        return None
    return (f"a {mem / GiB:.1f} GiB guest does not fit: {avail / GiB:.1f} GiB of memory "
            "available here")


def run_row(row: Row, s: GridSettings, net: netns.Network | str,
            say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run one row ``s.repeat`` times; its report (see the module docstring)."""
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    raw, loaded = Yardstick(), Yardstick()
    why_not = net if isinstance(net, str) else memory_short(row.mem or s.mem)
    if why_not is not None or isinstance(net, str):  # the row says why it could not run
        ours.append(failed("unavailable", why_not or "no network"))
        theirs.append(failed("unavailable", why_not or "no network"))
    else:
        for i in range(1, s.repeat + 1):
            ours.append(_counted(net, lambda: _livemig(row, s, net)))
            say(_line(row.name, "livemig", i, s.repeat, ours[-1]))
            # A QEMU that is missing or lacks the feature will not have it next time either.
            if s.vs_qemu and not (theirs and theirs[-1].get("status") in ("unsupported",
                                                                          "unavailable")):
                theirs.append(_counted(net, lambda: _qemu(row, s, net)))
                say(_line(row.name, "qemu", i, s.repeat, theirs[-1]))
            if not s.raw_copy:
                continue
            say(f"{row.name:14s} raw copy run {i}/{s.repeat}: "
                + raw.add(_raw_copy(row, s, net)))
            if row.name in LOADED_COPY_ROWS and row.link is None:
                say(f"{row.name:14s} raw copy beside the guest {i}/{s.repeat}: "
                    + loaded.add(_raw_copy_beside_guest(row, s, net)))
        if not theirs:
            theirs.append(failed("not-run", "QEMU not asked for (--vs-qemu)"))
    raw_med = raw.median()
    rep = report.build_report(f"{row.name}: {row.title}", ours, theirs, raw_med,
                              ratio_keys=report.GRID_RATIO_KEYS)
    rep.update({
        "row": row.name,
        "title": row.title,
        "workload": row.workload,
        "cmdline": guest_cmdline(row, s),
        "mem": row.mem or s.mem,
        "network": net if isinstance(net, str) else net.describe(),
        "livemig_args": ["--mode", row.mode,
                         "--max-downtime", str(row.max_downtime_ms or s.max_downtime_ms),
                         *row.livemig_args],
        "qemu_config": dict(row.qemu),
        "qemu_bytes_per_s": report.throughput(rep["qemu"]),
        "runs": {"livemig": ours, "qemu": theirs, "raw_copy_bytes_per_s": raw.rates},
    })
    if raw.errors and raw_med is None:
        rep["raw_copy_error"] = raw.errors[0]
    loaded_med = loaded.median()
    if loaded_med is not None:
        rep["raw_copy_loaded_bytes_per_s"] = loaded_med
        rep["raw_copy_loaded_fraction"] = report.ratio(rep["livemig_bytes_per_s"], loaded_med)
        rep["runs"]["raw_copy_loaded_bytes_per_s"] = loaded.rates
    elif loaded.errors:
        rep["raw_copy_loaded_error"] = loaded.errors[0]
    return rep


def _line(row: str, who: str, i: int, n: int, r: dict[str, Any]) -> str:
    head = f"{row:14s} {who:8s} run {i}/{n}: {r.get('status')}"
    if "total_ms" not in r:
        return f"{head}: {r.get('error', '')}"
    mib = (r.get("bytes_sent") or 0) / 2**20
    faults = r.get("faults") or {}
    pulled = f", {faults.get('count')} faults" if faults.get("count") else ""
    gap = r.get("guest_gap_ms")
    return (f"{head} ({r.get('mode')}) total {r.get('total_ms', 0):.0f} ms, downtime "
            f"{r.get('downtime_ms', 0):.0f} ms, gap "
            f"{'n/a' if gap is None else f'{gap:.0f} ms'}, "
            f"{mib:.1f} MiB, {r.get('rounds')} rounds{pulled}")


# A goal: (row, figure, comparison, target, what it says). The figure is a ratio's name
# (report ``ratios``), else a dotted path into the row's report ("raw_copy_fraction",
# "livemig.faults.latency_ms.p50").
Goal = tuple[str, str, str, float, str]

# The goals for the grid (issue 9).
GOALS: list[Goal] = [
    ("default", "total", "<=", 0.5, "hot-set default total <= 0.5x QEMU"),
    ("default", "downtime", "<=", 0.8, "hot-set default downtime <= 0.8x QEMU"),
    ("xbzrle", "bytes", "<=", 0.3, "--xbzrle bytes <= 0.3x QEMU's xbzrle row"),
    ("streams2", "total", "<=", 1.0, "--streams 2 total <= QEMU multifd 2's"),
    ("default", "raw_copy_fraction", ">=", 0.7,
     "plain migration throughput >= 0.7 of the raw socket copy"),
    ("plain", "raw_copy_fraction", ">=", 0.7,
     "plain migration throughput >= 0.7 of the raw socket copy, dense guest (`plain` row)"),
    ("plain-prealloc", "raw_copy_fraction", ">=", 0.7,
     "plain migration throughput >= 0.7 of the raw socket copy, dense guest, destination RAM "
     "allocated ahead on both sides (`plain-prealloc` row)"),
    ("idle-4g", "total", "<=", 0.8, "idle 4 GiB total <= 0.8x QEMU"),
]


def _goal_value(rep: dict[str, Any], figure: str) -> float | None:
    rats = rep.get("ratios", {})
    if figure == "bytes" and rats.get("link_bytes") is not None:
        return float(rats["link_bytes"])
    if figure in rats:
        return None if rats[figure] is None else float(rats[figure])
    cur: Any = rep
    for key in figure.split("."):
        cur = cur.get(key) if isinstance(cur, dict) else None
    if not isinstance(cur, int | float) or isinstance(cur, bool):
        return None
    return float(cur)


def check_goals(reports: Sequence[dict[str, Any]],
                goals: Sequence[Goal] = GOALS) -> list[dict[str, Any]]:
    """Each goal with its measured value and whether the rows met it (None: not measured,
    because the row did not run or a side did not complete). Bytes compare what crossed the
    link when it was counted, else each side's own count."""
    by_row = {r.get("row"): r for r in reports}
    out = []
    for row, figure, op, target, text in goals:
        rep = by_row.get(row)
        value = None if rep is None else _goal_value(rep, figure)
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        out.append({"goal": text, "row": row, "figure": figure, "target": f"{op} {target}",
                    "value": value, "met": met})
    return out


@contextlib.contextmanager
def _networks(use_netns: bool) -> Iterator[_Networks]:
    with contextlib.ExitStack() as stack:
        yield _Networks(stack, use_netns)


def run_rows(kind: str, rows: Sequence[Row], s: GridSettings, goals: Sequence[Goal],
             say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run ``rows`` in order, each on its network; the JSON-ready result, goals checked."""
    reports = []
    with _networks(s.netns) as nets:
        for row in rows:
            net = nets.get(row.link)
            say(f"{row.name}: {row.title} ({net if isinstance(net, str) else net.describe()})")
            reports.append(run_row(row, s, net, say))
    return {
        "grid": kind,
        "settings": {"mem": s.mem, "wss": s.wss, "vcpus": s.vcpus, "repeat": s.repeat,
                     "max_downtime_ms": s.max_downtime_ms, "xbzrle_cache": s.xbzrle_cache,
                     "auth": s.auth, "timeout_s": s.timeout_s},
        "rows": reports,
        "goals": check_goals(reports, goals),
    }


def run_grid(names: Sequence[str], s: GridSettings,
             say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run the named rows (all when empty), in grid order; the grid's JSON-ready result."""
    rows = [r for r in grid_rows(s) if not names or r.name in names]
    return run_rows("precopy", rows, s, GOALS, say)
