"""ARM guests through the CLI: `livemig run --arch arm64`, `save --stop`, `restore` in another
process; the guests go on reporting success with their per-CPU counters continuing. No KVM."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT, MachineProcess, run_cli, wait_for

ARM_GUESTS = ROOT / "guests" / "arm64" / "build"
LINE = re.compile(r"^(\w+) (hb|ok) (\d+) cpu=(\d+)$")


def arm_image(name: str) -> str:
    path = ARM_GUESTS / f"{name}.elf"
    assert path.is_file(), f"guest image {path} missing: run `make -C guests/arm64`"
    return str(path)


def counters(console: Path, workload: str) -> dict[str, dict[int, list[int]]]:
    """Every `hb` and `ok` value the guest printed, per kind and CPU, in order."""
    out: dict[str, dict[int, list[int]]] = {"hb": {}, "ok": {}}
    if not console.exists():
        return out
    for line in console.read_text(errors="replace").splitlines():
        m = LINE.match(line.strip())
        if m and m.group(1) == workload:
            out[m.group(2)].setdefault(int(m.group(4)), []).append(int(m.group(3)))
    return out


def failures(console: Path) -> list[str]:
    text = console.read_text(errors="replace") if console.exists() else ""
    return [ln for ln in text.splitlines() if "FAIL" in ln or "[livemig]" in ln]


def has_ok_on_every_cpu(console: Path, workload: str, above: dict[int, int]) -> bool:
    oks = counters(console, workload)["ok"]
    return all(oks.get(c) and oks[c][-1] > v for c, v in above.items())


@pytest.mark.parametrize("workload,cmdline", [("verify", "wss=16M rate=20000"),
                                              ("cpustate", "hb=50")])
def test_arm_save_restore_in_another_process(machines, tmp_path: Path, workload: str,
                                             cmdline: str) -> None:
    src: MachineProcess = machines(["run", arm_image(workload), "--arch", "arm64", "--mem",
                                    "64M", "--vcpus", "2", "--append", cmdline], "src")
    assert src.ctl("status")["arch"] == "arm64"
    wait_for(lambda: has_ok_on_every_cpu(src.console, workload, {0: 0, 1: 0})
             and set(counters(src.console, workload)["hb"]) >= {0, 1}, 30,
             "an OK report and a heartbeat from both vCPUs")
    snap = tmp_path / "snap.lms"
    res = run_cli("save", src.control, str(snap), "--stop")
    assert res.returncode == 0, res.stderr
    assert src.proc.wait(10) == 0
    assert failures(src.console) == []
    before = counters(src.console, workload)
    last_hb = {c: v[-1] for c, v in before["hb"].items()}
    last_ok = {c: v[-1] for c, v in before["ok"].items()}
    assert set(last_hb) == {0, 1}

    dst = machines(["restore", str(snap)], "dst")
    def both_continue() -> bool:
        hbs = counters(dst.console, workload)["hb"]
        return has_ok_on_every_cpu(dst.console, workload, last_ok) and set(hbs) >= {0, 1}
    wait_for(both_continue, 30, "OK reports and heartbeats on both vCPUs after restore")
    after = counters(dst.console, workload)
    for cpu in (0, 1):
        hbs = after["hb"][cpu]
        assert last_hb[cpu] < hbs[0] <= last_hb[cpu] + 3, (cpu, last_hb, hbs[:3])  # continues
        assert hbs == sorted(set(hbs)), f"vCPU {cpu} heartbeats not strictly increasing"
    status = dst.ctl("status")
    assert status["arch"] == "arm64" and status["state"] == "running"
    assert status["error"] is None and status["probe"]["counts"]["fail"] == 0
    assert failures(dst.console) == []


def test_arm_pause_resume_and_quit(machines) -> None:
    m = machines(["run", arm_image("cpustate"), "--arch", "arm64", "--mem", "32M",
                  "--vcpus", "1", "--append", "hb=50"], "m")
    m.wait_heartbeat_above(1)
    assert m.ctl("pause")["state"] == "paused"
    held = m.heartbeat()
    assert m.ctl("status")["state"] == "paused" and m.heartbeat() == held
    assert m.ctl("resume")["state"] == "running"
    m.wait_heartbeat_above(held)
    assert m.ctl("quit")["ok"]
    assert m.proc.wait(10) == 0
