"""Templates and clones: `livemig template save SOCK PATH` writes a running `verify` guest's
memory (sparse: data ranges only) and state with a BLAKE3 content id, and the guest runs on;
`livemig run --template PATH` starts clones whose RAM maps the template copy-on-write. Two
clones pass the guest's own checks, and each takes less guest-RAM PSS than the ordinary
machine the template came from (the pages they never wrote are shared in the page cache). A
clone is saved as a template again (chained) and its clone passes too. A template whose
memory was changed after it was saved is refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import MachineProcess, image, kvm_usable, run_cli, wait_for
from test_arm_cli import arm_image

from livemig.bench.footprint import ram_pss
from livemig.migration import templates

CASES = [
    pytest.param("x86_64", marks=pytest.mark.skipif(not kvm_usable(), reason="no usable KVM")),
    "arm64",
]


def verify_source(machines, arch: str, cmdline: str = "wss=8M rate=10") -> MachineProcess:
    img = image("verify") if arch == "x86_64" else arm_image("verify")
    mem = "256M" if arch == "x86_64" else "64M"
    src = machines(["run", img, "--arch", arch, "--mem", mem, "--vcpus", "2", "--append",
                    cmdline], "src")
    wait_ok(src)
    return src


def wait_ok(m: MachineProcess, more_than: int = 0) -> int:
    return int(wait_for(lambda: (n := m.ctl("status")["probe"]["counts"]["ok"]) > more_than
                        and n, 90, "a verify pass"))


def save_template(m: MachineProcess, path: Path) -> templates.Template:
    res = run_cli("template", "save", m.control, str(path))
    assert res.returncode == 0, res.stderr
    t = templates.load(path)
    assert t.content_id in res.stdout
    return t


@pytest.mark.parametrize("arch", CASES)
def test_clones_share_the_template_and_pass(machines, tmp_path: Path, arch: str) -> None:
    src = verify_source(machines, arch)
    t = save_template(src, tmp_path / "tpl")
    assert t.parent is None and t.data_pages > 0
    mem = t.memory_path.stat()
    assert mem.st_size == t.config.mem_size
    assert mem.st_blocks * 512 < mem.st_size // 2  # sparse: only the data ranges
    oks = src.ctl("status")["probe"]["counts"]["ok"]
    wait_ok(src, oks)  # seamless: the guest ran on after the template was taken
    templates.verify(t)

    clones = [machines(["run", "--template", str(t.path)], f"clone{i}") for i in range(2)]
    for c in clones:
        wait_ok(c)
        assert c.ctl("status")["state"] == "running" and c.failures() == 0
    ordinary = ram_pss(src.proc.pid)
    for c in clones:
        assert 0 < ram_pss(c.proc.pid) < ordinary, (ram_pss(c.proc.pid), ordinary)

    chained = save_template(clones[0], tmp_path / "tpl2")
    assert chained.parent == t.content_id and chained.content_id != t.content_id
    grandchild = machines(["run", "--template", str(chained.path)], "grandchild")
    wait_ok(grandchild)
    assert grandchild.failures() == 0 and clones[0].failures() == 0


def test_tampered_template_is_refused(machines, tmp_path: Path) -> None:
    arch = "x86_64" if kvm_usable() else "arm64"
    src = verify_source(machines, arch, "wss=1M rate=10")
    t = save_template(src, tmp_path / "tpl")
    mem = t.memory_path
    os.chmod(mem, 0o600)
    with open(mem, "r+b") as f:
        f.seek(os.lseek(f.fileno(), 0, os.SEEK_DATA) + 100)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x5A]))
    res = run_cli("run", "--template", str(t.path), "--control", str(tmp_path / "c.sock"))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "tampered" in lines[0], res.stderr
    assert not (tmp_path / "c.sock").exists()
