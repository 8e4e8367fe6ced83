"""The virtio-net NIC, the netserve guest, the network lab and the soft network handover, on
real guests in real network namespaces (docs/guest-abi.md, livemig.migration.netforward)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AUTH, LIVEMIG, ROOT, MachineProcess, image, needs_kvm, run_cli, wait_for

from livemig.bench import netlab, netping
from livemig.bench.netns import can_make_namespaces

MAC = "52:54:00:4c:4d:01"


def _lab_missing() -> str | None:
    why = can_make_namespaces()
    if why is None and shutil.which("ping") is None:
        why = "ping (iputils-ping) is not installed"
    return why


needs_lab = pytest.mark.skipif(_lab_missing() is not None,
                               reason=f"no network lab here: {_lab_missing()}")


@pytest.fixture(scope="module")
def lab() -> Iterator[netlab.Lab]:
    with netlab.lab(f"lt{os.getpid() % 1000000}") as made:
        yield made


def serve(machines: Callable[..., MachineProcess], lab: netlab.Lab, name: str = "src",
          append: str = "hb=100") -> MachineProcess:
    """netserve on the lab's source host, behind its TAP."""
    m = machines(["run", image("netserve"), "--mem", "64M", "--net", f"tap={lab.tap},mac={MAC}",
                  "--append", append], name, lab.exec("src"))
    m.wait_heartbeat_above(0, 30)
    return m


def client(lab: netlab.Lab, *args: str, timeout: float = 120) -> Any:
    """`livemig.bench.netclient` in the client namespace; its JSON output."""
    res = subprocess.run([*lab.exec("cli"), sys.executable, "-m", "livemig.bench.netclient",
                          lab.guest_ip, *args], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT, env=_env())
    assert res.stdout.strip(), res.stderr
    return json.loads(res.stdout)


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT / "src")}


def check_serves(lab: netlab.Lab) -> None:
    """Ping and the UDP key-value protocol both answer from the client namespace."""
    p = netping.finish(netping.start(lab.exec("cli"), lab.guest_ip, 40, 0.01), 60)
    assert p.received == p.sent == 40, p
    r = client(lab, "--rate", "200", "--duration", "2", "--keys", "256")
    assert r["ok"] and r["lost"] == 0 and r["replied"] == r["sent"] == 400, r
    assert r["readback_checked"] > 0 and r["readback_wrong"] == 0, r


# -- bad input --------------------------------------------------------------------------------


def test_malformed_mac_is_bad_input() -> None:
    for mac in ("52:54:00:12:34", "zz:54:00:12:34:56", "01:00:5e:00:00:01"):
        res = run_cli("run", image("netserve"), "--net", f"tap=lmx0,mac={mac}")
        assert res.returncode == 2, res
        assert "MAC address" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_net_option_without_tap_is_bad_input() -> None:
    res = run_cli("run", image("netserve"), "--net", "mac=52:54:00:12:34:56")
    assert res.returncode == 2 and "tap=NAME" in res.stderr, res


@needs_kvm
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                    or shutil.which("setpriv") is None,
                    reason="needs root, unshare and setpriv to take TUN/TAP away")
def test_tap_that_cannot_be_opened() -> None:
    base = [*LIVEMIG, "run", image("netserve"), "--mem", "64M", "--console", "none",
            "--net", "tap=lmx0"]
    cases = {
        # no /dev/net/tun on this host (a private mount namespace hides it)
        "does not exist": ["unshare", "-m", "sh", "-c",
                           "mount -t tmpfs none /dev/net && exec \"$@\"", "sh", *base],
        # not allowed to make a TAP (no CAP_NET_ADMIN)
        "permission denied": ["setpriv", "--bounding-set=-net_admin",
                              "--inh-caps=-net_admin", *base],
    }
    for why, cmd in cases.items():
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env())
        assert res.returncode == 2, res
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot open TAP lmx0" in lines[0] and why in lines[0], res
    res = run_cli("run", image("netserve"), "--mem", "64M", "--net", "tap=lo")
    assert res.returncode == 2 and "is not a TAP" in res.stderr, res


@needs_kvm
@needs_lab
def test_guest_queue_outside_ram(lab: netlab.Lab,
                                 machines: Callable[..., MachineProcess]) -> None:
    """A guest that puts its receive queue outside RAM gets one error line; the guest and the
    hypervisor go on."""
    m = serve(machines, lab, "bad", "hb=50 badqueue=1")
    log = Path(m.control).with_suffix(".log")
    wait_for(lambda: "not RAM" in log.read_text(), 20, "the NIC's error line")
    h = m.heartbeat()
    m.wait_heartbeat_above(h + 3)
    errors = [ln for ln in log.read_text().splitlines() if "net0:" in ln]
    assert len(errors) == 1 and "queue 0" in errors[0] and "not RAM" in errors[0], errors
    assert m.ctl("status")["state"] == "running"
    p = netping.finish(netping.start(lab.exec("cli"), lab.guest_ip, 3, 0.2), 30)
    assert p.received == 0  # the NIC stopped serving that guest, nothing else did


# -- serving --------------------------------------------------------------------------------


@needs_kvm
@needs_lab
def test_netserve_answers_ping_and_udp(lab: netlab.Lab,
                                       machines: Callable[..., MachineProcess]) -> None:
    m = serve(machines, lab)
    check_serves(lab)
    assert m.failures() == 0


@needs_kvm
@needs_lab
def test_netserve_under_qemu(lab: netlab.Lab, tmp_path: Path) -> None:
    from livemig.bench import qemu
    from livemig.bench.netbench import PROBE_NIC, qemu_nic_args

    try:
        binary = qemu.find_qemu()
    except qemu.QemuNotFoundError as e:
        pytest.skip(str(e))
    cfg = qemu.QemuMigrationConfig(image=image("netserve"), mem="64M", extra_args=PROBE_NIC)
    cpu = qemu.choose_cpu_model(binary, cfg, 60)
    cfg.extra_args = []
    serial = tmp_path / "serial.log"
    argv = [*lab.exec("src"), *qemu.base_argv(binary, cfg, cpu), "-serial", f"file:{serial}",
            *qemu_nic_args(lab.tap, MAC)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: serial.exists() and "netserve hb 1" in serial.read_text()
                 or proc.poll() is not None, 60, "netserve under QEMU")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        check_serves(lab)
    finally:
        proc.terminate()
        proc.wait(10)


@needs_kvm
@needs_lab
def test_nic_state_survives_save_and_restore(lab: netlab.Lab,
                                             machines: Callable[..., MachineProcess],
                                             tmp_path: Path) -> None:
    from livemig import snapshot

    m = serve(machines, lab)
    before = client(lab, "--put", "7=0x1234", "--put", "65535=99", "--get", "7")
    assert [r["value"] for r in before] == [0x1234, 99, 0x1234]
    snap = str(tmp_path / "net.snap")
    res = run_cli("save", m.control, snap, "--stop")
    assert res.returncode == 0, res.stderr
    m.proc.wait(20)
    nic = snapshot.read(snap).state.devices["net0"]
    assert nic["mac"] == bytes.fromhex(MAC.replace(":", ""))
    assert all(q[0] for q in nic["queues"]) and nic["queues"][0][1] > 0  # rings, frames seen
    r = machines(["restore", snap, "--net", f"tap={lab.tap}"], "restored", lab.exec("src"))
    r.wait_heartbeat_above(m.heartbeat() if m.proc.poll() is None else 0)
    after = client(lab, "--get", "7", "--get", "65535")
    assert [x["value"] for x in after] == [0x1234, 99]
    assert after[0]["served"] > before[-1]["served"]  # the same guest, counting on
    check_serves(lab)


@needs_kvm
@needs_lab
def test_restore_without_a_tap_for_the_nic(lab: netlab.Lab,
                                           machines: Callable[..., MachineProcess],
                                           tmp_path: Path) -> None:
    m = serve(machines, lab)
    snap = str(tmp_path / "net.snap")
    assert run_cli("save", m.control, snap, "--stop").returncode == 0
    res = run_cli("restore", snap, "--console", "none")
    assert res.returncode == 2 and "--net tap=NAME" in res.stderr, res


# -- migration --------------------------------------------------------------------------------


class NsListener:
    """`livemig listen --once` on the lab's destination host, behind its TAP."""

    def __init__(self, lab: netlab.Lab, tmp: Path, net: bool = True) -> None:
        self.control = str(tmp / "dst.sock")
        self.log = tmp / "dst.log"
        self.proc = subprocess.Popen(
            [*lab.exec("dst"), *LIVEMIG, "listen", "--host", lab.dst_ip, "--port", "0",
             "--once", *AUTH, *(["--net", f"tap={lab.tap}"] if net else []),
             "--console", str(tmp / "dst.console"), "--control", self.control],
            stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stderr is not None
        m = re.search(r":(\d+)\s*$", self.proc.stderr.readline())
        assert m, "listen did not say its port"
        self.port = int(m.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            from livemig.control import ControlError, request
            try:
                request(self.control, "quit")
            except ControlError:
                self.proc.terminate()
        self.proc.communicate(timeout=20)


@pytest.fixture
def listener(lab: netlab.Lab, tmp_path: Path) -> Iterator[NsListener]:
    lst = NsListener(lab, tmp_path)
    yield lst
    lst.stop()


@needs_kvm
@needs_lab
@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_soft_net_migration_loses_no_request(lab: netlab.Lab,
                                             machines: Callable[..., MachineProcess],
                                             listener: NsListener, mode: str) -> None:
    """500 requests a second while the guest moves: none lost, every value read back right
    (post-copy: the NIC keeps off guest RAM until every page is there)."""
    m = serve(machines, lab)
    load = subprocess.Popen([*lab.exec("cli"), sys.executable, "-m",
                             "livemig.bench.netclient", lab.guest_ip, "--rate", "500",
                             "--duration", "5"], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env=_env())
    time.sleep(2)  # the load under way (past the client's warm-up) when the move starts
    res = run_cli("migrate", m.control, "--to", f"{lab.dst_ip}:{listener.port}", *AUTH,
                  "--mode", mode, "--json", timeout=120)
    out, _ = load.communicate(timeout=120)
    stats = json.loads(res.stdout)
    assert res.returncode == 0 and stats["status"] == "completed", res.stderr
    assert stats["net"]["ended"] in ("idle", "bound"), stats["net"]
    r = json.loads(out)
    assert r["sent"] == 2500 and r["lost"] == 0 and r["duplicates"] == 0, r
    assert r["wrong_values"] == 0 and r["served_regressions"] == 0, r
    assert r["readback_checked"] == 1250 and r["readback_wrong"] == 0, r


@needs_kvm
@needs_lab
def test_destination_without_a_tap_refuses(lab: netlab.Lab, tmp_path: Path,
                                           machines: Callable[..., MachineProcess]) -> None:
    """A destination that has no TAP for the machine's NIC refuses it at CONFIG; the source
    runs on and keeps serving."""
    m = serve(machines, lab)
    lst = NsListener(lab, tmp_path, net=False)
    try:
        res = run_cli("migrate", m.control, "--to", f"{lab.dst_ip}:{lst.port}", *AUTH,
                      "--json", timeout=120)
        stats = json.loads(res.stdout)
        assert res.returncode != 0 and stats["status"] == "failed", stats
        assert "--net tap=NAME" in stats["error"], stats["error"]
    finally:
        lst.proc.terminate()
        lst.proc.communicate(timeout=20)
    assert m.ctl("status")["state"] == "running"
    check_serves(lab)


@needs_lab
def test_netlab_cli() -> None:
    name = f"lc{os.getpid() % 1000000}"
    try:
        res = run_cli("netlab", "up", "--name", name)
        assert res.returncode == 0, res.stderr
        info = json.loads(res.stdout)
        assert info["ns_cli"] == f"{name}-cli" and netlab.exists(name)
        ping = subprocess.run([*netlab.Lab(name).exec("cli"), "ping", "-c", "1", "-W", "5",
                               info["dst_ip"]], capture_output=True, timeout=30)
        assert ping.returncode == 0  # client reaches the destination host through the switch
    finally:
        assert run_cli("netlab", "down", "--name", name).returncode == 0
    assert not netlab.exists(name)
    assert run_cli("netlab", "up", "--name", "no-dashes!").returncode == 2

