"""Bad input gets one line naming the problem and exit status 2, never a traceback; a failed
migration says first, in one line, what happened and what state each side is left in."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    AUTH,
    LIVEMIG,
    ROOT,
    Listener,
    future_version_destination,
    image,
    needs_kvm,
    run_cli,
)

from livemig import units
from livemig.migration.options import parse_rate as engine_parse_rate


def one_line(res: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """The single non-empty stderr line of a command that exited with `code`."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


# -- sizes and rates: one parser, binary units ----------------------------------------------


def test_sizes_and_rates_agree_on_binary_units() -> None:
    assert units.parse_size("1G") == 2**30 == units.parse_rate("1G")
    assert units.parse_size("512MiB") == 512 << 20
    assert units.parse_size("64Ki") == units.parse_size("64k") == 65536
    assert units.parse_size("1.5G") == 3 << 29
    assert units.parse_rate("100M/s") == units.parse_rate("100MB/s") == 100 * 2**20
    assert engine_parse_rate("1G") == 2**30  # still importable where the engine had it
    for bad in ("lots", "1X", "", "-1", "1.1"):
        with pytest.raises(ValueError):
            units.parse_size(bad)
    for bad in ("0", "fast", "1G/h"):
        with pytest.raises(ValueError, match="rate"):
            units.parse_rate(bad)


def test_bad_size_and_rate_are_one_line() -> None:
    one_line(run_cli("run", image("idle"), "--mem", "lots"), 2, "'lots' is not a size",
             "1G = 2^30 bytes")
    one_line(run_cli("migrate", "/nonexistent.sock", "--to", "127.0.0.1:1",
                     "--max-bandwidth", "1X"), 2, "--max-bandwidth", "is not a rate")


def test_help_documents_binary_units() -> None:
    assert "1G = 2^30 bytes" in " ".join(run_cli("run", "--help").stdout.split())
    assert "1G = 2^30 bytes/s" in " ".join(run_cli("migrate", "--help").stdout.split())


# -- usage and paths --------------------------------------------------------------------------


def test_usage_error_is_one_line() -> None:
    one_line(run_cli("run", "--foo"), 2, "livemig: error: No such option", "--foo",
             "(try 'livemig run --help')")
    one_line(run_cli("frobnicate"), 2, "No such command")


def test_directory_as_image_or_snapshot(tmp_path: Path) -> None:
    one_line(run_cli("run", str(tmp_path)), 2, str(tmp_path), "is a directory")
    one_line(run_cli("restore", str(tmp_path)), 2, str(tmp_path), "is a directory")


def test_missing_directories_are_named(tmp_path: Path) -> None:
    sock = str(tmp_path / "no" / "dir" / "s.sock")
    one_line(run_cli("run", image("idle"), "--control", sock), 2, sock, "does not exist")
    con = str(tmp_path / "no" / "console.txt")
    one_line(run_cli("run", image("idle"), "--console", con), 2, con, "No such file")
    one_line(run_cli("listen", "--port", "0", "--control", sock, *AUTH), 2, sock,
             "does not exist")


def test_listen_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        one_line(run_cli("listen", "--host", "127.0.0.1", "--port", str(port), *AUTH), 2,
                 f"cannot listen on 127.0.0.1:{port}", "in use")


def test_migrate_to_bad_addresses() -> None:
    def migrate(to: str) -> subprocess.CompletedProcess[str]:
        return run_cli("migrate", "/nonexistent.sock", "--to", to, *AUTH)

    one_line(migrate("no-such-host.invalid:4444"), 2, "no-such-host.invalid", "cannot resolve")
    one_line(migrate("127.0.0.1:99999"), 2, "99999", "out of range")
    one_line(migrate("127.0.0.1"), 2, "HOST:PORT")
    one_line(migrate("127.0.0.1:1"), 2, "/nonexistent.sock", "cannot reach control socket")


# -- ctl --------------------------------------------------------------------------------------


@pytest.fixture
def fake_control(tmp_path: Path) -> Iterator[tuple[str, list[bytes], list[bytes]]]:
    """A unix socket answering each request line with the next canned answer; the requests
    it received."""
    path = str(tmp_path / "fake.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    answers: list[bytes] = []
    seen: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c, c.makefile("rwb") as f:
                seen.append(f.readline())
                f.write(answers.pop(0) if answers else b'{"ok": true}\n')
                f.flush()

    threading.Thread(target=serve, daemon=True).start()
    yield path, answers, seen
    srv.close()


def test_ctl_values_that_look_like_json(fake_control: tuple[str, list[bytes], list[bytes]]
                                        ) -> None:
    path, _, seen = fake_control
    res = run_cli("ctl", path, "status", "x=1a", "n=1", "flag=true", "name=nightly.snap",
                  "list=[1,2]", "s=\"q\"", "t=tru")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert json.loads(seen[0]) == {"cmd": "status", "x": "1a", "n": 1, "flag": True,
                                   "name": "nightly.snap", "list": [1, 2], "s": "q",
                                   "t": "tru"}


def test_ctl_reply_not_json(fake_control: tuple[str, list[bytes], list[bytes]]) -> None:
    path, answers, _ = fake_control
    answers.append(b"hello, I am not JSON\n")
    one_line(run_cli("ctl", path, "status"), 2, path, "not a JSON object")
    answers.append(b"[1, 2]\n")
    one_line(run_cli("ctl", path, "status"), 2, path, "not a JSON object")


def test_ctl_error_reply_is_one_line(fake_control: tuple[str, list[bytes], list[bytes]]
                                     ) -> None:
    path, answers, _ = fake_control
    answers.append(b'{"ok": false, "error": "no\\nway"}\n')
    one_line(run_cli("ctl", path, "pause"), 1, "livemig: pause: no way")


# -- a failed migration: one line first, no stats table ---------------------------------------


@needs_kvm
def test_failed_migration_says_what_state_is_left(machines) -> None:
    src = machines(["run", image("idle"), "--mem", "256M"], "src")
    src.wait_heartbeat_above(0)
    port = closed_port()
    # Nothing listens: nothing was sent, the address was wrong: bad input.
    one_line(run_cli("migrate", src.control, "--to", f"127.0.0.1:{port}", *AUTH), 2,
             f"cannot connect to 127.0.0.1:{port}", "the source machine runs on")
    # A destination that refuses (protocol version 99): a failed migration, exit 1.
    host, fport = future_version_destination()
    line = one_line(run_cli("migrate", src.control, "--to", f"{host}:{fport}", *AUTH), 1)
    assert line.startswith("livemig: migration failed: "), line
    assert line.endswith("; the source machine is running again"), line
    assert src.ctl("status")["state"] == "running"
    before = src.heartbeat()
    src.wait_heartbeat_above(before)


@needs_kvm
def test_completed_migration_shows_the_table(machines, tmp_path: Path) -> None:
    src = machines(["run", image("idle"), "--mem", "256M"], "src")
    src.wait_heartbeat_above(0)
    dst = Listener(tmp_path)
    try:
        res = subprocess.run([*LIVEMIG, "migrate", src.control, "--to", f"127.0.0.1:{dst.port}",
                              *AUTH],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        assert "migration completed" in res.stderr and "bytes sent" in res.stderr, res.stderr
        dst.ctl("quit")
    finally:
        dst.stop()
