"""`livemig listen` and `livemig migrate` as separate processes, with a real guest on KVM."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import AUTH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm (KVM guests)"
)
LIVEMIG = [sys.executable, "-c", "from livemig.cli.main import main; main()"]

SOURCE = """
import sys
from livemig.cli.main import serve_machine
from livemig.cli.migrate_cmds import register_migration_controls
from livemig.cli.runner import MachineHost, build_machine
from livemig.contract import Arch, MachineConfig
cfg = MachineConfig(Arch.X86_64, 256 << 20, 2, sys.argv[1], "")
m = build_machine(cfg, None)
m.start()
host = MachineHost(m, sys.argv[2])
register_migration_controls(host)
serve_machine(host)
"""


def wait_for(path: str) -> None:
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def ctl(path: str, cmd: str) -> dict[str, Any]:
    from livemig.control import request

    return request(path, cmd)


def test_listen_and_migrate_json(tmp_path: Any) -> None:
    src_ctl, dst_ctl = str(tmp_path / "src.sock"), str(tmp_path / "dst.sock")
    image = os.path.join(ROOT, "guests", "build", "idle.elf")
    src = subprocess.Popen([sys.executable, "-c", SOURCE, image, src_ctl],
                           stderr=subprocess.PIPE)
    dst = subprocess.Popen([*LIVEMIG, "listen", "--host", "127.0.0.1", "--port", "0", *AUTH,
                            "--console", "none", "--control", dst_ctl], stderr=subprocess.PIPE)
    try:
        assert dst.stderr is not None
        line = dst.stderr.readline().decode()
        port = re.search(r":(\d+)\s*$", line)
        assert port, line
        wait_for(src_ctl)
        time.sleep(0.5)
        out = subprocess.run(
            [*LIVEMIG, "migrate", src_ctl, "--to", f"127.0.0.1:{port.group(1)}", *AUTH,
             "--verify-memory", "--json"], capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr.decode() + out.stdout.decode()[-3000:]
        res = json.loads(out.stdout)
        assert res["status"] == "completed" and res["verified_memory"] is True
        assert set(res) >= {"mode", "total_ms", "downtime_ms", "setup_ms", "rounds",
                            "bytes_sent", "pages", "guest_gap_ms"}
        src.wait(15)  # the source host exits once migrated
        wait_for(dst_ctl)
        st = ctl(dst_ctl, "status")
        assert st["state"] == "running"
        beats = st["probe"]["counts"]["heartbeat"]
        time.sleep(0.5)
        assert ctl(dst_ctl, "status")["probe"]["counts"]["heartbeat"] > beats
        ctl(dst_ctl, "quit")
        dst.wait(15)
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.kill()
