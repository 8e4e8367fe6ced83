"""CPU-state migration timed per register count: the thesis' Tables 5 and 6 (seed 000).

The thesis (Xvisor on Raspberry Pi 3, ARMv8, 2 vCPUs) captured 4, 8, 12, 17, 20 and 34
registers of each vCPU in the order of Xvisor's ``arch_regs`` buffer (SP, LR, PC, PSTATE, then
X0..X29), sent them in one UDP datagram to the destination, and adopted them there into the
destination's vCPUs with a separate command. Its timer ran from the start of the send command
(argument checks, capture, socket set-up) to the return of ``sendto``: no acknowledgement, and
the adoption was not timed. Table 5: 39.6, 71.0, 94.2, 123.1, 140.6, 216.7 ms; Table 6: ten runs
of 34 registers, 413.94 ms each (+-4 us).

Here, per trial: pause the running ARM guest (source process), capture that many registers
of every vCPU in the thesis' order, send them as one message over an open TCP connection to a
destination process holding an ARMv8 machine of the same config, which adopts them into its
vCPUs and acknowledges. The time is pause .. acknowledgement received (a superset of what the
thesis timed); it is split into pause, capture, transfer (send + adopt + acknowledgement) and
the destination's adopt time. The source resumes after each trial and runs a little before
the next, so every pause hits a running guest. The same is done for the full machine state
(docs/arm-state.md). After each trial the destination reports a digest of the registers it
holds, read back, which must equal the digest of what the source captured.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from livemig.arm import Armv8Machine
from livemig.bench.cpustate_udp import (
    THESIS_DATAGRAM,
    SerialConsole,
    UdpClient,
    UdpError,
    UdpTrial,
    new_key,
)
from livemig.bench.cpustate_wire import (
    PeerError,
    digest,
    pack_registers,
    recv_msg,
    send_msg,
    vcpus_digest,
)
from livemig.contract import MachineConfig
from livemig.probe import ProbeKind

# Xvisor's ARMv8 arch_regs as the thesis filled its send buffer: SP, LR, PC, PSTATE, X0..X29.
THESIS_ORDER: tuple[str, ...] = ("sp", "lr", "pc", "pstate", *(f"x{i}" for i in range(30)))
THESIS_REGS = (4, 8, 12, 17, 20, 34)
# Table 5, nanoseconds, 2 vCPUs.
THESIS_TABLE5_NS: dict[int, int] = {
    4: 39_558_973, 8: 70_986_854, 12: 94_170_851,
    17: 123_134_306, 20: 140_559_983, 34: 216_740_826,
}
# Table 6, nanoseconds: ten consecutive runs of 34 registers per vCPU, 2 vCPUs.
THESIS_TABLE6_NS: tuple[int, ...] = (
    413_941_146, 413_941_872, 413_936_093, 413_937_450, 413_941_246,
    413_935_727, 413_940_316, 413_940_259, 413_942_705, 413_942_966,
)
THESIS_VCPUS = 2
PEER_START_TIMEOUT = 30.0


class BenchError(Exception):
    """The benchmark cannot run or its destination misbehaved; the message is for the user."""


@dataclass
class Trial:
    """One timed migration of a register set (ms)."""

    total_ms: float
    pause_ms: float
    capture_ms: float
    transfer_ms: float
    adopt_ms: float
    exact: bool


@dataclass
class Row:
    """All trials of one register count (or of the full state, `regs` = None)."""

    regs: int | None
    names: list[str]
    bytes: int
    trials: list[Trial] = field(default_factory=list)

    def median(self, key: str) -> float:
        """Median of one Trial field over the trials."""
        return float(statistics.median(getattr(t, key) for t in self.trials))

    def to_dict(self) -> dict[str, Any]:
        """The JSON row: medians, every run's total, the thesis figure and ours/thesis."""
        thesis_ns = THESIS_TABLE5_NS.get(self.regs) if self.regs is not None else None
        med = self.median("total_ms")
        return {
            "regs": self.regs, "names": self.names, "bytes": self.bytes,
            "thesis_ms": thesis_ns / 1e6 if thesis_ns else None,
            "median_ms": med,
            "ratio": med / (thesis_ns / 1e6) if thesis_ns else None,
            "runs_ms": [t.total_ms for t in self.trials],
            **{k: self.median(k) for k in ("pause_ms", "capture_ms", "transfer_ms", "adopt_ms")},
            "adopted_exact": all(t.exact for t in self.trials),
        }


def register_names(count: int) -> list[str]:
    """The first `count` registers of the thesis' order (1..34)."""
    if not 1 <= count <= len(THESIS_ORDER):
        raise BenchError(f"register count {count} is outside 1..{len(THESIS_ORDER)} "
                         f"(SP, LR, PC, PSTATE, X0..X29)")
    return list(THESIS_ORDER[:count])


class PeerLink:
    """An open connection to a destination peer process."""

    def __init__(self, sock: Any, proc: subprocess.Popen[str] | None) -> None:
        self.sock = sock
        self.proc = proc
        self.pid: int | None = None

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send a message, return the acknowledgement; BenchError if the peer refused it."""
        send_msg(self.sock, msg)
        return self._reply()

    def _reply(self) -> dict[str, Any]:
        try:
            reply = recv_msg(self.sock)
        except (PeerError, OSError) as e:
            raise BenchError(f"destination peer went away: {e}") from e
        if reply.get("ok") is False:
            raise BenchError(f"destination peer refused: {reply.get('error')}")
        return reply

    def next_reply(self) -> dict[str, Any]:
        """The message following an acknowledgement (the digest)."""
        return self._reply()


@contextlib.contextmanager
def peer_link(config: MachineConfig, address: tuple[str, int] | None = None) -> Iterator[PeerLink]:
    """Connect to a peer at `address`, or spawn a local one (a separate Python process)."""
    import socket

    proc: subprocess.Popen[str] | None = None
    errlog = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed below
    try:
        if address is None:
            proc = subprocess.Popen(
                [sys.executable, "-m", "livemig.bench.cpustate_peer", "--listen", "127.0.0.1:0"],
                stdout=subprocess.PIPE, stderr=errlog, text=True)
            address = _peer_address(proc, errlog)
        try:
            sock = socket.create_connection(address, timeout=30)
        except OSError as e:
            raise BenchError(f"cannot reach destination peer {address[0]}:{address[1]}: {e}") \
                from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = PeerLink(sock, proc)
        try:
            hello = link.request({"op": "hello", "config": config.to_dict()})
            link.pid = int(hello.get("pid", 0)) or None
            yield link
            with contextlib.suppress(OSError):
                send_msg(sock, {"op": "bye"})
        finally:
            sock.close()
    finally:
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        errlog.close()


def _peer_address(proc: subprocess.Popen[str], errlog: Any) -> tuple[str, int]:
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 3 or line[0] != "listening":
        proc.kill()
        proc.wait()
        errlog.seek(0)
        raise BenchError(f"destination peer did not start: {errlog.read().strip()[-800:]}")
    return line[1], int(line[2])


def _trial_registers(machine: Armv8Machine, link: PeerLink, names: list[str]) -> Trial:
    t0 = time.perf_counter()
    machine.pause()
    t1 = time.perf_counter()
    captured = [machine.get_registers(i, names) for i in range(machine.config.vcpus)]
    payload = pack_registers(captured, names)
    t2 = time.perf_counter()
    ack = link.request({"op": "regs", "names": names, "values": payload})
    t3 = time.perf_counter()
    machine.resume()
    exact = link.next_reply().get("digest") == digest(payload)
    return Trial((t3 - t0) * 1e3, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3,
                 float(ack.get("adopt_ms", 0.0)), exact)


def _trial_state(machine: Armv8Machine, link: PeerLink) -> tuple[Trial, int]:
    t0 = time.perf_counter()
    machine.pause()
    t1 = time.perf_counter()
    state = machine.save_state()
    blob = state.encode()
    t2 = time.perf_counter()
    ack = link.request({"op": "state", "state": blob})
    t3 = time.perf_counter()
    machine.resume()
    exact = link.next_reply().get("digest") == vcpus_digest(state)
    trial = Trial((t3 - t0) * 1e3, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3,
                  float(ack.get("adopt_ms", 0.0)), exact)
    return trial, len(blob)


def _wait_running(machine: Armv8Machine, timeout: float = 30.0) -> None:
    """Wait until every vCPU has sent a heartbeat: the guest is up and running."""
    deadline = time.monotonic() + timeout
    want = set(range(machine.config.vcpus))
    while time.monotonic() < deadline:
        if want <= {e.vcpu for e in machine.probe.events(ProbeKind.HEARTBEAT)}:
            return
        if machine.stopped.is_set():
            break
        time.sleep(0.02)
    raise BenchError(f"guest did not heartbeat on every vCPU within {timeout:.0f}s"
                     + (f": {machine.error}" if machine.error else ""))


def _udp_trials(machine: Armv8Machine, link: PeerLink, names: list[str], repeat: int,
                gap: float, client: UdpClient, console: SerialConsole) -> list[UdpTrial]:
    n = machine.config.vcpus
    trials = []
    for _ in range(repeat):
        time.sleep(gap)
        machine.pause()
        try:
            trials.append(client.trial(
                lambda: [machine.get_registers(i, names) for i in range(n)], names, console))
        except UdpError as e:
            raise BenchError(str(e)) from e
        finally:
            machine.resume()
    return trials


def _udp_row(regs: int, trials: list[UdpTrial]) -> dict[str, Any]:
    thesis_ns = THESIS_TABLE5_NS.get(regs)
    med = {k: float(statistics.median(getattr(t, k) for t in trials))
           for k in ("thesis_ms", "livemig_ms", "capture_ms", "print_ms", "roundtrip_ms",
                     "adopt_ms")}
    return {"regs": regs, "thesis_table_ms": thesis_ns / 1e6 if thesis_ns else None,
            "thesis_interval_ms": med["thesis_ms"], "livemig_ms": med["livemig_ms"],
            **{k: med[k] for k in ("capture_ms", "print_ms", "roundtrip_ms", "adopt_ms")},
            "thesis_interval_runs_ms": [t.thesis_ms for t in trials],
            "livemig_runs_ms": [t.livemig_ms for t in trials],
            "adopted_exact": all(t.exact for t in trials)}


def run_udp(machine: Armv8Machine, link: PeerLink, counts: Sequence[int], repeat: int,
            gap: float, console: SerialConsole) -> dict[str, Any]:
    """Both intervals per count over UDP (`livemig.bench.cpustate_udp`); the `udp` report."""
    key = new_key()
    port = int(link.request({"op": "udp", "key": key})["port"])
    client = UdpClient((link.sock.getpeername()[0], port), key)
    rows = []
    try:
        for n in counts:
            rows.append(_udp_row(n, _udp_trials(machine, link, register_names(n), repeat, gap,
                                                client, console)))
    finally:
        client.close()
    received = link.next_reply().get("counts", {})
    return {"rows": rows, "console_baud": console.baud, "datagram_bytes": THESIS_DATAGRAM,
            "peer_received": received}


def run(config: MachineConfig, counts: Sequence[int], repeat: int = 5, gap: float = 0.05,
        peer: tuple[str, int] | None = None, full_state: bool = True,
        udp_console: SerialConsole | None = None) -> dict[str, Any]:
    """Run the experiment on a fresh source machine; returns the JSON report (see module doc).

    `gap` is how long the guest runs between trials; `peer` is the address of a running
    `livemig.bench.cpustate_peer` (default: spawn one locally). With `udp_console` the trials
    go over UDP instead (`run_udp`), the thesis' interval printing to that console.
    """
    if repeat < 1:
        raise BenchError("--repeat must be at least 1")
    rows = [Row(n, register_names(n), 8 * n * config.vcpus) for n in counts]
    machine = Armv8Machine(config)
    try:
        machine.start()
        _wait_running(machine)
        with peer_link(config, peer) as link:
            if udp_console is not None:
                hb_before = machine.probe.counts[ProbeKind.HEARTBEAT]
                udp = run_udp(machine, link, counts, repeat, gap, udp_console)
                time.sleep(max(gap, 0.2))
                guest = _guest(machine, hb_before)
                return {**_report(config, [], None, repeat, guest, peer, link.pid),
                        "rows": [], "transport": "udp", "udp": udp,
                        "timed": "thesis: capture + console + sendto; livemig: capture + "
                                 "send + adopt + acknowledgement"}
            _trial_registers(machine, link, rows[0].names)  # warm-up, not counted
            hb_before = machine.probe.counts[ProbeKind.HEARTBEAT]
            for row in rows:
                for _ in range(repeat):
                    time.sleep(gap)
                    row.trials.append(_trial_registers(machine, link, row.names))
            full: Row | None = None
            if full_state:
                full = Row(None, ["all"], 0)
                for _ in range(repeat):
                    time.sleep(gap)
                    trial, full.bytes = _trial_state(machine, link)
                    full.trials.append(trial)
            time.sleep(max(gap, 0.2))
            guest = _guest(machine, hb_before)
            peer_pid = link.pid
    finally:
        machine.close()
    return _report(config, rows, full, repeat, guest, peer, peer_pid)


def _guest(machine: Armv8Machine, hb_before: int) -> dict[str, Any]:
    return {"heartbeats_during": machine.probe.counts[ProbeKind.HEARTBEAT] - hb_before,
            "failures": machine.probe.counts[ProbeKind.FAIL], "error": machine.error}


def _report(config: MachineConfig, rows: list[Row], full: Row | None, repeat: int,
            guest: dict[str, Any], peer: tuple[str, int] | None,
            peer_pid: int | None) -> dict[str, Any]:
    table6: dict[str, Any] | None = None
    row34 = next((r for r in rows if r.regs == 34), None)
    if row34 is not None:
        runs = [t.total_ms for t in row34.trials]
        thesis = [ns / 1e6 for ns in THESIS_TABLE6_NS]
        med = statistics.median(runs)
        table6 = {
            "regs": 34, "runs_ms": runs, "median_ms": med,
            "thesis_runs_ms": thesis, "thesis_median_ms": statistics.median(thesis),
            "ratio": med / statistics.median(thesis),
        }
    full_dict = None
    if full is not None:
        full_dict = full.to_dict()
        full_dict["names"] = "every vCPU map of docs/arm-state.md + VM and device state"
    return {
        "benchmark": "cpu-state",
        "arch": config.arch.value, "vcpus": config.vcpus, "mem_size": config.mem_size,
        "image": os.path.basename(config.image), "cmdline": config.cmdline,
        "repeat": repeat,
        "transport": f"tcp {peer[0]}:{peer[1]}" if peer else "tcp loopback, spawned peer",
        "peer_pid": peer_pid,
        "thesis_vcpus": THESIS_VCPUS,
        "register_order": list(THESIS_ORDER),
        "timed": "pause .. destination's acknowledgement (after adoption)",
        "rows": [r.to_dict() for r in rows],
        "full_state": full_dict,
        "table6": table6,
        "guest": guest,
    }


def plot(report: dict[str, Any], path: str) -> None:
    """Time against registers per vCPU: the thesis' Table 5 beside what was measured here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    thesis = sorted(THESIS_TABLE5_NS.items())
    ax.plot([n for n, _ in thesis], [ns / 1e6 for _, ns in thesis], "o--", color="grey",
            label="thesis Table 5 (Xvisor, RPi 3)")
    if report["transport"] == "udp":
        rows = report["udp"]["rows"]
        regs = [r["regs"] for r in rows]
        ax.plot(regs, [r["thesis_interval_ms"] for r in rows], "s-",
                label=f"thesis' interval here (console {report['udp']['console_baud']} baud)")
        ax.plot(regs, [r["livemig_ms"] for r in rows], "^-", label="livemig: adopted + acked")
    else:
        rows = report["rows"]
        ax.plot([r["regs"] for r in rows], [r["median_ms"] for r in rows], "^-",
                label="livemig: pause .. ack (TCP)")
    ax.set_xlabel("registers per vCPU")
    ax.set_ylabel("ms (median)")
    ax.set_yscale("log")
    ax.set_title(f"CPU-state migration, {report['vcpus']} vCPUs, {report['transport']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
