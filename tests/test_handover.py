"""Same-host handover (`livemig migrate SOCK --to unix:PATH`): a running `verify` guest (2
vCPUs, 1 GiB) moves to a new livemig process on this host with its RAM passed as memfds
(SCM_RIGHTS), on x86 (KVM) and arm64. No page is sent, the destination maps the very memfd
the source had (same inode), and the guest's own checks keep passing there. A destination
that dies before COMMIT, with the RAM mapped, leaves the source running and intact."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    AUTH,
    KEY_FILE,
    LIVEMIG,
    ROOT,
    MachineProcess,
    image,
    kvm_usable,
    run_cli,
    wait_for,
)
from test_arm_cli import arm_image

MEM = "1G"
CASES = [
    pytest.param("x86_64", marks=pytest.mark.skipif(not kvm_usable(), reason="no usable KVM")),
    "arm64",
]


def guest(arch: str) -> list[str]:
    img = image("verify") if arch == "x86_64" else arm_image("verify")
    return ["run", img, "--arch", arch, "--mem", MEM, "--vcpus", "2", "--append",
            "wss=4M rate=2000"]


def ram_inodes(pid: int) -> set[int]:
    """Inodes of the guest-RAM memfds mapped by process `pid`."""
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if re.search(r"memfd:livemig-(arm-)?ram", line):
            out.add(int(line.split()[4]))
    return out


def wait_ok(m: MachineProcess, more_than: int = 0) -> int:
    return int(wait_for(lambda: (n := m.ctl("status")["probe"]["counts"]["ok"]) > more_than
                        and n, 60, "a verify pass"))


def start_listener(tmp: Path, argv: list[str], port: bool = False) -> subprocess.Popen[str]:
    """A `livemig listen` process; with `port`, the TCP port it chose is set as `.port`."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _LISTENERS.append(proc)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "listening" in line, line
    if port:
        m = re.search(r":(\d+)\s*$", line)
        assert m, line
        proc.port = int(m.group(1))  # type: ignore[attr-defined]
    return proc


_LISTENERS: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _kill_listeners() -> Iterator[None]:
    """Listeners a test started end with it, even when it failed before stopping them."""
    yield
    while _LISTENERS:
        p = _LISTENERS.pop()
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)


@pytest.mark.parametrize("arch", CASES)
def test_handover_copies_no_ram(machines, tmp_path: Path, arch: str) -> None:
    src = machines(guest(arch), "src")
    oks = wait_ok(src)
    inodes = ram_inodes(src.proc.pid)
    assert len(inodes) == 1
    path = str(tmp_path / "dst.mig")
    dst = start_listener(tmp_path, [*LIVEMIG, "listen", "--unix", path, "--once", *AUTH,
                                    "--console", str(tmp_path / "dst.console"),
                                    "--control", str(tmp_path / "dst.sock")])
    try:
        res = run_cli("migrate", src.control, "--to", f"unix:{path}", *AUTH, "--json")
        assert res.returncode == 0, res.stderr
        stats = json.loads(res.stdout)
        assert stats["status"] == "completed" and stats["mode"] == "handover", stats
        assert stats["pages"] == {} and stats["bytes_sent"] < 64 << 10, stats
        assert ram_inodes(dst.pid) == inodes  # the very memfd: no copy of RAM was made
        assert src.proc.wait(15) == 0
        from livemig.control import request
        ctl = str(tmp_path / "dst.sock")
        st = request(ctl, "status")
        assert st["state"] == "running" and st["mem_size"] == 1 << 30, st
        wait_for(lambda: request(ctl, "status")["probe"]["counts"]["ok"] > oks + 1, 60,
                 "verify passes at the destination")
        assert request(ctl, "status")["probe"]["counts"]["fail"] == 0
        request(ctl, "quit")
    finally:
        if dst.poll() is None:
            dst.kill()
        dst.communicate(timeout=10)


@pytest.mark.parametrize("arch", CASES)
def test_handover_to_a_process_dying_before_commit_leaves_the_source_running(
        machines, tmp_path: Path, arch: str) -> None:
    src = machines(guest(arch), "src")
    oks = wait_ok(src)
    path = str(tmp_path / "dying.mig")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    dst = subprocess.Popen([sys.executable, str(ROOT / "tests" / "dying_destination.py"), path,
                            KEY_FILE], stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        assert dst.stderr is not None
        assert "listening" in dst.stderr.readline()
        res = run_cli("migrate", src.control, "--to", f"unix:{path}", *AUTH, "--json")
        assert res.returncode != 0
        stats = json.loads(res.stdout)
        assert stats["status"] == "failed", stats
        assert dst.wait(10) == -9  # it did die, by SIGKILL, with the RAM mapped
        assert "dying with the RAM mapped" in dst.stderr.read()
        st = src.ctl("status")
        assert st["state"] == "running" and st["error"] is None, st
        wait_ok(src, oks + 2)  # RAM intact: the guest's checks go on passing
        assert src.failures() == 0
    finally:
        if dst.poll() is None:
            dst.kill()
        dst.communicate(timeout=10)


@pytest.mark.skipif(not kvm_usable(), reason="no usable KVM: x86 clones cannot run")
def test_handover_of_a_clone_copies_only_its_deltas(machines, tmp_path: Path) -> None:
    from livemig.migration import templates

    src = machines(["run", image("verify"), "--mem", "256M", "--vcpus", "2", "--append",
                    "wss=8M rate=20"], "src")
    wait_ok(src)
    assert run_cli("template", "save", src.control, str(tmp_path / "tpl")).returncode == 0
    t = templates.load(tmp_path / "tpl")
    clone = machines(["run", "--template", str(t.path)], "clone")
    oks = wait_ok(clone)
    path = str(tmp_path / "dst.mig")
    dst = start_listener(tmp_path, [*LIVEMIG, "listen", "--unix", path, "--once", *AUTH,
                                    "--console", "none", "--control", str(tmp_path / "d.sock")])
    res = run_cli("migrate", clone.control, "--to", f"unix:{path}", *AUTH, "--json")
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    events = [e["event"] for e in stats["events"]]
    assert stats["status"] == "completed" and "handover-template" in events, stats
    sent = sum(stats["pages"].values())
    assert sent < t.data_pages // 2, (sent, t.data_pages)  # the deltas only
    from livemig.control import request
    ctl = str(tmp_path / "d.sock")
    wait_for(lambda: request(ctl, "status")["probe"]["counts"]["ok"] >= 1, 60,
             "a verify pass at the destination")
    st = request(ctl, "status")
    assert st["state"] == "running" and st["probe"]["counts"]["fail"] == 0, (st, oks)
    request(ctl, "quit")
    dst.wait(20)
