"""Control sockets admit only their owner: mode 0600 in a private directory, and SO_PEERCRED;
`--control` never deletes what is not a socket; `save path=` never overwrites and takes only
absolute paths; a successful migration after a failed one is reported as completed."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from conftest import AUTH, LIVEMIG, ROOT, Listener, image, needs_kvm, run_cli, wait_for
from test_cli_errors import closed_port, one_line

import livemig
from livemig.control import ControlError, ControlServer, default_control_dir, request

OTHER_UID = 65534  # nobody
SRC = str(Path(livemig.__file__).resolve().parent.parent)
SITE = str(Path(click.__file__).resolve().parent.parent)
# The test's own interpreter may live where another user cannot go (/root/.pyenv): the
# system's Python of the same version, with our sources and site-packages, runs the client.
OTHER_PY = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(OTHER_PY),
                                reason=f"needs root (to run a client as uid {OTHER_UID}) "
                                       f"and {OTHER_PY}")


def as_other_user(*args: str) -> subprocess.CompletedProcess[str]:
    """`livemig ARGS` run as uid 65534."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{SRC}:{SITE}", "HOME": "/"}
    return subprocess.run([OTHER_PY, "-m", "livemig", *args], capture_output=True, text=True,
                          timeout=60, cwd="/", env=env, user=OTHER_UID, group=OTHER_UID,
                          extra_groups=[])


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """An $XDG_RUNTIME_DIR that other users may traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="livemig-test-xdg-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class DefaultMachine:
    """`livemig run idle` with the default control path, under XDG_RUNTIME_DIR=`runtime`."""

    def __init__(self, runtime: Path) -> None:
        self.log = runtime / "machine.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*LIVEMIG, "run", image("idle"), "--mem", "256M", "--console", "none"],
                stderr=log, cwd=ROOT, env=os.environ | {"XDG_RUNTIME_DIR": str(runtime)})
        m = wait_for(lambda: re.search(r"control socket (\S+)", self.log.read_text())
                     or self.proc.poll() is not None, 30, "the control socket line")
        assert self.proc.poll() is None, self.log.read_text()
        self.control = m.group(1)
        wait_for(lambda: os.path.exists(self.control), 10, "the control socket")

    def stop(self) -> None:
        try:
            request(self.control, "quit")
        except ControlError:
            self.proc.terminate()
        self.proc.wait(15)


@needs_kvm
@needs_root
def test_default_socket_is_private_and_admits_only_our_uid(runtime_dir: Path) -> None:
    m = DefaultMachine(runtime_dir)
    try:
        folder = Path(m.control).parent
        assert folder == runtime_dir / "livemig"
        assert Path(m.control).name == f"{m.proc.pid}.sock"
        st_dir, st_sock = folder.lstat(), Path(m.control).lstat()
        assert stat.S_ISDIR(st_dir.st_mode) and stat.S_IMODE(st_dir.st_mode) == 0o700
        assert stat.S_ISSOCK(st_sock.st_mode) and stat.S_IMODE(st_sock.st_mode) == 0o600
        assert st_dir.st_uid == st_sock.st_uid == os.geteuid()

        # Another user cannot even reach the socket: the directory stops it (EACCES).
        one_line(as_other_user("ctl", m.control, "status"), 2,
                 f"cannot reach control socket {m.control}", "Permission denied")

        # Opened up by hand, the socket is reachable; the server still refuses the peer.
        folder.chmod(0o777)
        Path(m.control).chmod(0o777)
        one_line(as_other_user("ctl", m.control, "status"), 1,
                 f"admits only uid {os.geteuid()}, not uid {OTHER_UID}")
        refused = [ln for ln in m.log.read_text().splitlines() if "refused" in ln]
        assert refused == [f"livemig: control: refused a client with uid {OTHER_UID}"], refused
        assert "Traceback" not in m.log.read_text()
        assert request(m.control, "status")["state"] == "running"  # we still get in
    finally:
        m.stop()


@needs_root
def test_a_control_directory_that_is_not_private_is_refused(runtime_dir: Path) -> None:
    env = os.environ | {"XDG_RUNTIME_DIR": str(runtime_dir)}
    d = runtime_dir / "livemig"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LIVEMIG, "run", image("idle"), "--console", "none"],
                              capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)

    d.mkdir(mode=0o755)
    d.chmod(0o755)
    one_line(run(), 2, str(d), "open to other users", "0755")
    d.rmdir()
    private = runtime_dir / "elsewhere"
    private.mkdir(mode=0o700)
    d.symlink_to(private)
    one_line(run(), 2, str(d), "symlink")
    d.unlink()
    d.mkdir(mode=0o700)
    os.chown(d, OTHER_UID, OTHER_UID)
    one_line(run(), 2, str(d), f"belongs to uid {OTHER_UID}")
    d.rmdir()
    d.write_text("")
    one_line(run(), 2, str(d), "not a directory")


def test_default_directory_without_xdg_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    d = default_control_dir()
    assert d == f"/tmp/livemig-{os.geteuid()}"
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()


def test_control_on_a_regular_file_leaves_it_intact(tmp_path: Path) -> None:
    f = tmp_path / "precious.txt"
    f.write_text("do not delete me\n")
    one_line(run_cli("run", image("idle"), "--control", str(f)), 2,
             f"{f} exists and is not a socket")
    assert f.read_text() == "do not delete me\n"
    one_line(run_cli("listen", "--port", "0", "--control", str(f), *AUTH), 2,
             f"{f} exists and is not a socket")
    assert f.read_text() == "do not delete me\n"
    one_line(run_cli("run", image("idle"), "--control", str(tmp_path)), 2,
             "exists and is not a socket")


@needs_kvm
def test_stale_socket_is_replaced_live_one_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    proc = subprocess.Popen([*LIVEMIG, "run", image("idle"), "--mem", "256M", "--console",
                             "none", "--control", path], stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        def up() -> bool:
            try:
                return request(path, "status")["ok"] is True
            except ControlError:
                return False
        wait_for(lambda: up() or proc.poll() is not None, 30, "the machine's control socket")
        assert proc.poll() is None
        one_line(run_cli("run", image("idle"), "--control", path), 2, path, "in use")
        assert request(path, "status")["state"] == "running"
    finally:
        request(path, "quit")
        proc.wait(15)


@needs_kvm
def test_save_path_policy(machines, tmp_path: Path) -> None:
    m = machines(["run", image("idle"), "--mem", "256M"], "m")
    m.wait_heartbeat_above(0)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LIVEMIG, *args], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)

    # ctl passes the path as given: a relative one is refused (and no JSON trouble with it).
    one_line(cli("ctl", m.control, "save", "path=nightly.snap"), 1, "nightly.snap",
             "not an absolute path")
    assert not (tmp_path / "nightly.snap").exists()
    one_line(cli("ctl", m.control, "save", "path=/nonexistent/dir/x.snap"), 1,
             "/nonexistent/dir", "does not exist")

    # An existing file is never overwritten (livemig save makes the path absolute itself).
    keep = tmp_path / "exists.snap"
    keep.write_bytes(b"keep me")
    one_line(cli("save", m.control, "exists.snap"), 2, str(keep), "exists",
             "does not overwrite")
    assert keep.read_bytes() == b"keep me"

    before = set(os.listdir(tmp_path))
    res = cli("save", m.control, "new.snap")
    assert res.returncode == 0, res.stderr
    new = tmp_path / "new.snap"
    assert str(new) in res.stdout
    assert new.stat().st_size > 0 and stat.S_IMODE(new.stat().st_mode) == 0o600
    assert set(os.listdir(tmp_path)) - before == {"new.snap"}  # no temporary file left
    one_line(cli("save", m.control, "new.snap"), 2, "exists")

    assert m.ctl("status")["state"] == "running"
    res = cli("ctl", m.control, "status", "x=1a")
    assert res.returncode == 0 and json.loads(res.stdout)["state"] == "running", res.stderr


@needs_kvm
def test_successful_retry_after_a_failed_migration(machines, tmp_path: Path) -> None:
    src = machines(["run", image("idle"), "--mem", "256M"], "src")
    src.wait_heartbeat_above(0)
    port = closed_port()
    failed = run_cli("migrate", src.control, "--to", f"127.0.0.1:{port}", "--json", *AUTH)
    assert failed.returncode != 0 and json.loads(failed.stdout)["status"] == "failed"
    assert src.ctl("status")["state"] == "running"
    dst = Listener(tmp_path)
    try:
        res = subprocess.run([*LIVEMIG, "migrate", src.control, "--to",
                              f"127.0.0.1:{dst.port}", "--json", *AUTH],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert res.returncode == 0, (res.stdout, res.stderr)
        out = json.loads(res.stdout)
        assert out["status"] == "completed" and out["error"] is None, out
        src.proc.wait(15)  # the source host exits once migrated, after its status was read
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not os.path.exists(dst.control):
            time.sleep(0.05)
        assert dst.ctl("status")["state"] == "running"
        dst.ctl("quit")
    finally:
        dst.stop()


def test_close_lets_a_reply_being_written_go_out(tmp_path: Path) -> None:
    """A handler may end the process (a migrated-away host goes once its final status is
    read): close() waits for the replies being written, so the client still gets its own."""
    d = tmp_path / "ctl"
    d.mkdir(mode=0o700)
    server = ControlServer(str(d / "s.sock"))
    asked, release = threading.Event(), threading.Event()

    def final(_req: dict) -> dict:
        asked.set()  # what lets the host go, as query-migrate's final status does
        release.wait(10)
        return {"status": "completed"}

    server.register("final", final)
    server.start()
    replies: list[dict] = []
    client = threading.Thread(target=lambda: replies.append(request(server.path, "final")))
    client.start()
    assert asked.wait(10)
    closer = threading.Thread(target=server.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "close() returned while a reply was still being written"
    release.set()
    closer.join(10)
    client.join(10)
    assert not closer.is_alive() and replies and replies[0]["status"] == "completed"
