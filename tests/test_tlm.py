"""Template-aware migration (`livemig migrate --mode tlm`): a clone of a `verify` template
migrates to a `livemig listen --templates DIR` that holds its template, sending only its own
pages (fewer than the template holds), with --verify-memory, and the guest passes at the
destination. A destination without the template says so in the hello: the migration then
ships the template first (--ship-template; the destination keeps it) or goes generic, and the
stats say which. A destination whose copy of the template was altered refuses the migration
with one line, and the source runs on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AUTH, LIVEMIG, MachineProcess, image, kvm_usable, run_cli, wait_for
from test_handover import start_listener, wait_ok

from livemig.control import request
from livemig.migration import templates

pytestmark = pytest.mark.skipif(not kvm_usable(), reason="no usable KVM: x86 clones cannot run")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[templates.Template]:
    """A template of a `verify` guest (256M, 2 vCPUs, wss=8M rewritten slowly)."""
    tmp = tmp_path_factory.mktemp("tlm")
    src = MachineProcess(["run", image("verify"), "--mem", "256M", "--vcpus", "2",
                          "--append", "wss=8M rate=20"], tmp, "tsrc")
    try:
        wait_ok(src)
        assert run_cli("template", "save", src.control, str(tmp / "tpl")).returncode == 0
    finally:
        src.stop()
    yield templates.load(tmp / "tpl")


def holding(tmp: Path, t: templates.Template, tamper: bool = False) -> Path:
    """A templates directory holding a copy of `t` (altered by one byte if `tamper`)."""
    d = tmp / "templates"
    d.mkdir()
    copy = d / "t"
    subprocess.run(["cp", "-r", "--sparse=always", str(t.path), str(copy)], check=True)
    if tamper:
        mem = copy / templates.MEMORY
        os.chmod(mem, 0o600)
        with open(mem, "r+b") as f:
            off = os.lseek(f.fileno(), 0, os.SEEK_DATA) + 4096 + 7
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 1]))
    return d


Outcome = tuple[MachineProcess, dict[str, Any], subprocess.Popen[str],
                subprocess.CompletedProcess[str]]


def migrate_clone(machines, tmp: Path, t: templates.Template, templates_dir: Path,
                  *flags: str, as_json: bool = True) -> Outcome:
    clone = machines(["run", "--template", str(t.path)], "clone")
    wait_ok(clone)
    dst = start_listener(tmp, [*LIVEMIG, "listen", "--host", "127.0.0.1", "--port", "0",
                               "--once", "--templates", str(templates_dir), *AUTH,
                               "--console", "none", "--control", str(tmp / "dst.sock")],
                         port=True)
    res = run_cli("migrate", clone.control, "--to", f"127.0.0.1:{dst.port}",  # type: ignore[attr-defined]
                  "--mode", "tlm", "--verify-memory", *AUTH, *flags,
                  *(["--json"] if as_json else []), timeout=180)
    return clone, json.loads(res.stdout) if as_json else {}, dst, res


def events(stats: dict[str, Any]) -> list[str]:
    return [e["event"] for e in stats["events"]]


def assert_runs_at_destination(tmp: Path, dst: subprocess.Popen[str]) -> None:
    ctl = str(tmp / "dst.sock")
    wait_for(lambda: request(ctl, "status")["probe"]["counts"]["ok"] >= 1, 90,
             "a verify pass at the destination")
    st = request(ctl, "status")
    assert st["state"] == "running" and st["probe"]["counts"]["fail"] == 0, st
    request(ctl, "quit")
    dst.wait(20)


def test_clone_migrates_sending_only_its_deltas(machines, tmp_path: Path,
                                                template: templates.Template) -> None:
    clone, stats, dst, res = migrate_clone(machines, tmp_path, template,
                                           holding(tmp_path, template))
    assert res.returncode == 0, res.stderr
    assert stats["status"] == "completed" and stats["verified_memory"] is True, stats
    assert "tlm:deltas" in events(stats)
    sent = sum(stats["pages"].values())
    assert 0 < sent < template.data_pages, (sent, template.data_pages)
    assert clone.proc.wait(15) == 0
    assert_runs_at_destination(tmp_path, dst)


def test_destination_without_the_template_falls_back_to_generic(
        machines, tmp_path: Path, template: templates.Template) -> None:
    empty = tmp_path / "none"
    empty.mkdir()
    _clone, stats, dst, res = migrate_clone(machines, tmp_path, template, empty)
    assert res.returncode == 0, res.stderr
    assert stats["status"] == "completed" and "tlm:generic" in events(stats), stats
    assert sum(stats["pages"].values()) >= template.data_pages // 2
    assert templates.ids(empty) == []
    assert_runs_at_destination(tmp_path, dst)


def test_destination_without_the_template_gets_it_shipped(
        machines, tmp_path: Path, template: templates.Template) -> None:
    empty = tmp_path / "none"
    empty.mkdir()
    _clone, stats, dst, res = migrate_clone(machines, tmp_path, template, empty,
                                            "--ship-template")
    assert res.returncode == 0, (stats.get("error"), stats.get("events"))
    ev = events(stats)
    assert stats["status"] == "completed" and "tlm:shipped" in ev and "tlm:deltas" in ev, ev
    assert sum(stats["pages"].values()) < template.data_pages
    assert templates.ids(empty) == [template.content_id]  # kept for the next clones
    templates.verify(templates.find(empty, template.content_id))  # type: ignore[arg-type]
    assert_runs_at_destination(tmp_path, dst)


def test_tampered_template_at_the_destination_is_refused(
        machines, tmp_path: Path, template: templates.Template) -> None:
    clone, _, dst, res = migrate_clone(machines, tmp_path, template,
                                       holding(tmp_path, template, tamper=True), as_json=False)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "tampered" in lines[0], res.stderr
    st = clone.ctl("status")
    assert st["state"] == "running", st
    oks = st["probe"]["counts"]["ok"]
    wait_ok(clone, oks)
    assert clone.failures() == 0
    dst.kill()
    dst.communicate(timeout=10)
    shutil.rmtree(tmp_path / "templates", ignore_errors=True)
