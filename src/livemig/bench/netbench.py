"""`livemig bench net`: a migration of `netserve` measured from outside the guest.

One network lab (livemig.bench.netlab) for the whole run. For each configuration (livemig
with soft handover, livemig announcing only, QEMU with `--vs-qemu`), `netserve` boots on the
source host behind its TAP, the destination waits behind its own; from the client namespace
`ping -i 0.002` and the UDP key-value client (livemig.bench.netclient, `rate` requests a
second, every value checked and read back at the end) run while the guest migrates after
`migrate_at` seconds. Reported per configuration: packets lost (UDP and ping), late replies,
the largest gap between replies the client saw, the largest ping RTT, and the migration's own
figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import livemig
from livemig.bench import netlab, netping
from livemig.bench.pair import MigrationPair, PairError
from livemig.bench.qemu import (
    QemuError,
    QemuMigrationConfig,
    choose_cpu_model,
    find_qemu,
    run_qemu_migration,
)
from livemig.control import ControlError, request
from livemig.images import guest_image
from livemig.migration.options import Mode

MAC = "52:54:00:4c:4d:10"
CMDLINE = "hb=100"
# What QEMU's -cpu model is probed with: netserve stops without a NIC (a NIC with no peer
# will do: the probe only waits for heartbeats).
PROBE_NIC = ["-device", "virtio-net-pci"]
# Strategies measured, in this order, when this livemig has them.
MODES = ("precopy", "postcopy", "hybrid")
PROBE_TIMEOUT_S = 60.0  # a busy host boots slowly: give each QEMU -cpu model this long
IN_PROGRESS = ("setup", "active", "postcopy-active", "postcopy-paused")


def qemu_nic_args(tap: str, mac: str) -> list[str]:
    """QEMU options for the NIC livemig gives `--net tap=TAP,mac=MAC`: virtio-net-pci on an
    existing TAP, no scripts."""
    return ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]


@dataclass
class NetBenchSettings:
    """One bench run's guest, load and timing."""

    mem: str = "64M"
    rate: float = 500.0  # UDP requests per second
    duration: float = 8.0  # seconds of load
    migrate_at: float = 3.0  # seconds into the load
    ping_interval: float = 0.002
    keys: int = 4096
    auth: str = "psk"
    repeat: int = 1  # runs of each configuration, interleaved
    link: str | None = "20mbit"  # every host's link to the switch shaped so (tc tbf); None: not
    lab: str = field(default_factory=lambda: f"lmb{os.getpid() % 100000}")


@dataclass
class NetRun:
    """One configuration's figures."""

    who: str
    mode: str
    migration: dict[str, Any]
    client: dict[str, Any]
    ping: dict[str, Any]
    error: str = ""

    def packets_lost(self) -> int | None:
        if "lost" not in self.client or "lost" not in self.ping:
            return None
        return int(self.client["lost"]) + int(self.ping["lost"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"packets_lost": self.packets_lost()}


class Clients:
    """The ping and the UDP client, running in the client namespace."""

    def __init__(self, lab: netlab.Lab, s: NetBenchSettings) -> None:
        env = os.environ | {"PYTHONPATH": str(Path(livemig.__file__).resolve().parent.parent)}
        self.udp = subprocess.Popen(
            [*lab.exec("cli"), sys.executable, "-m", "livemig.bench.netclient", lab.guest_ip,
             "--rate", str(s.rate), "--duration", str(s.duration), "--keys", str(s.keys)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.ping = netping.start(lab.exec("cli"), lab.guest_ip,
                                  int(s.duration / s.ping_interval), s.ping_interval)
        self.timeout = s.duration * 4 + 60

    def finish(self) -> tuple[dict[str, Any], dict[str, Any]]:
        out, err = self.udp.communicate(timeout=self.timeout)
        try:
            udp = json.loads(out)
        except ValueError:
            udp = {"error": (err.strip().splitlines() or ["no output"])[-1]}
        try:
            ping = netping.finish(self.ping, self.timeout).to_dict()
        except ValueError as e:
            ping = {"error": str(e)}
        return udp, ping


def run_livemig(lab: netlab.Lab, s: NetBenchSettings, mode: str, soft: bool) -> NetRun:
    who = "livemig soft-net" if soft else "livemig announce"
    pair = MigrationPair(guest_image("netserve"), s.mem, 1, CMDLINE, dst_host=lab.dst_ip,
                         src_prefix=lab.exec("src"), dst_prefix=lab.exec("dst"), auth=s.auth,
                         src_args=["--net", f"tap={lab.tap},mac={MAC}"],
                         dst_args=["--net", f"tap={lab.tap}"])
    with pair:
        pair.wait(lambda: pair.heartbeat(pair.src_sock) >= 3, 60, "the guest to boot")
        clients = Clients(lab, s)
        time.sleep(s.migrate_at)
        stats = _migrate(pair, mode, soft)
        udp, ping = clients.finish()
    return NetRun(who, mode, _migration_figures(stats), udp, ping, stats.get("error") or "")


def _migrate(pair: MigrationPair, mode: str, soft: bool) -> dict[str, Any]:
    """Ask the source machine to migrate, through its control socket, from this process (as
    QEMU is asked through QMP: no program starts on the host while the guest moves)."""
    auth: dict[str, Any] = {"key_file": None, "tls_dir": None, "insecure": False}
    args = iter(pair.src_auth)
    for a in args:
        if a == "--insecure":
            auth["insecure"] = True
        else:
            auth[a.lstrip("-").replace("-", "_")] = next(args)
    try:
        request(pair.src_sock, "migrate", to=pair.target, mode=mode, soft_net=soft, **auth)
        while (q := request(pair.src_sock, "query-migrate"))["status"] in IN_PROGRESS:
            time.sleep(0.05)
    except ControlError as e:
        return {"status": "failed", "error": str(e)}
    return (q.get("stats") or {}) | {"status": q.get("status"), "error": q.get("error")}


def _migration_figures(stats: dict[str, Any]) -> dict[str, Any]:
    keys = ("status", "total_ms", "downtime_ms", "guest_gap_ms", "bytes_sent", "net")
    return {k: stats.get(k) for k in keys}


def run_qemu(lab: netlab.Lab, s: NetBenchSettings) -> NetRun:
    binary = find_qemu()
    image = guest_image("netserve")
    cpu = choose_cpu_model(binary, QemuMigrationConfig(image, CMDLINE, s.mem,
                                                       extra_args=PROBE_NIC), PROBE_TIMEOUT_S)
    got: dict[str, Any] = {}

    def before() -> None:
        got["clients"] = Clients(lab, s)
        time.sleep(s.migrate_at)

    def after() -> None:
        got["udp"], got["ping"] = got["clients"].finish()

    cfg = QemuMigrationConfig(image, CMDLINE, s.mem, src_prefix=lab.exec("src"),
                              dst_prefix=lab.exec("dst"), listen_host=lab.dst_ip,
                              cpu_model=cpu, extra_args=qemu_nic_args(lab.tap, MAC),
                              before_migrate=before, after_migrate=after)
    r = run_qemu_migration(cfg).to_dict()
    return NetRun("qemu", "precopy", _migration_figures(r), got.get("udp", {}),
                  got.get("ping", {}), r.get("error", ""))


def run_bench(s: NetBenchSettings, vs_qemu: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Every configuration in one lab; the result, with the goals checked."""
    modes = [m for m in MODES if m in {x.value for x in Mode}]
    runs: list[NetRun] = []
    with netlab.lab(s.lab, s.link) as lab:
        for _ in range(s.repeat):  # interleaved, so that the host's noise hits all alike
            for mode in modes:
                for soft in (True, False):
                    runs.append(_guarded(f"livemig {mode} soft={soft}",
                                         partial(run_livemig, lab, s, mode, soft)))
                    say(_line(runs[-1]))
            if vs_qemu:
                runs.append(_guarded("qemu", partial(run_qemu, lab, s)))
                say(_line(runs[-1]))
    return {"settings": asdict(s), "runs": [r.to_dict() for r in runs],
            "goals": goals(runs)}


def _guarded(what: str, fn: Callable[[], NetRun]) -> NetRun:
    try:
        return fn()
    except (PairError, QemuError, OSError, subprocess.TimeoutExpired) as e:
        return NetRun(what, "", {"status": "failed"}, {}, {}, f"{type(e).__name__}: {e}")


def goals(runs: list[NetRun]) -> dict[str, Any]:
    """The issue's goals: soft handover loses 0 packets where QEMU loses some, and the client
    sees a largest gap no longer than under QEMU (medians over the repeats)."""
    soft = [r for r in runs if r.who == "livemig soft-net" and r.mode == "precopy"]
    qemu = [r for r in runs if r.who == "qemu"]
    if not soft or not qemu:
        return {"checked": False}
    s_lost, q_lost = [r.packets_lost() for r in soft], [r.packets_lost() for r in qemu]
    s_gap = _median([r.client.get("largest_gap_ms") for r in soft])
    q_gap = _median([r.client.get("largest_gap_ms") for r in qemu])
    return {
        "checked": True,
        "zero_loss": all(n == 0 for n in s_lost),
        "qemu_loses_some": any(n for n in q_lost),
        "gap_not_longer": s_gap is not None and q_gap is not None and s_gap <= q_gap,
        "livemig_lost": s_lost, "qemu_lost": q_lost,
        "livemig_gap_ms": s_gap, "qemu_gap_ms": q_gap,
    }


def _median(values: list[Any]) -> float | None:
    got = sorted(float(v) for v in values if v is not None)
    return got[len(got) // 2] if got else None


def _line(r: NetRun) -> str:
    c, p, m = r.client, r.ping, r.migration
    if r.error and not c:
        return f"{r.who} {r.mode}: {r.error}"
    return (f"{r.who} {r.mode}: {m.get('status')}, downtime {m.get('downtime_ms') or 0:.0f} ms"
            f"; UDP lost {c.get('lost')} late {c.get('late')} gap "
            f"{c.get('largest_gap_ms') or 0:.0f} ms at {c.get('largest_gap_at_s')} s "
            f"wrong {c.get('wrong_values')}"
            f"+{c.get('readback_wrong')}; ping lost {p.get('lost')}/{p.get('sent')} max rtt "
            f"{p.get('max_rtt_ms')} ms")


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["settings"]
    t = Table(title=f"netserve migration, client {s['rate']:.0f} req/s + ping every "
                    f"{s['ping_interval'] * 1000:.0f} ms, migrated {s['migrate_at']:.0f} s "
                    f"into {s['duration']:.0f} s, links {s['link'] or 'unshaped'}")
    for col in ("who", "mode", "status", "downtime ms", "UDP lost", "late", "largest gap ms",
                "values wrong", "ping lost", "max rtt ms", "forwarded"):
        t.add_column(col, justify="left" if col in ("who", "mode", "status") else "right")
    for r in result["runs"]:
        c, p, m = r["client"], r["ping"], r["migration"]
        net = m.get("net") or {}
        t.add_row(r["who"], r["mode"], str(m.get("status")), _num(m.get("downtime_ms")),
                  str(c.get("lost", "-")), str(c.get("late", "-")),
                  _num(c.get("largest_gap_ms")),
                  str(c.get("wrong_values", 0) + c.get("readback_wrong", 0)) if c else "-",
                  f"{p.get('lost', '-')}/{p.get('sent', '-')}", _num(p.get("max_rtt_ms")),
                  str(net.get("frames", "-")))
    Console(width=160).print(t)
    for r in result["runs"]:
        if r["error"]:
            print(f"{r['who']} {r['mode']}: {r['error']}")
    g = result["goals"]
    if g.get("checked"):
        print(f"goal: soft handover loses 0 packets where QEMU loses some: "
              f"{'met' if g['zero_loss'] and g['qemu_loses_some'] else 'NOT met'} "
              f"(livemig {g['livemig_lost']}, QEMU {g['qemu_lost']})")
        print(f"goal: largest gap seen by the client <= QEMU's (median): "
              f"{'met' if g['gap_not_longer'] else 'NOT met'} "
              f"(livemig {_num(g['livemig_gap_ms'])} ms, QEMU {_num(g['qemu_gap_ms'])} ms)")


def _num(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f}"
