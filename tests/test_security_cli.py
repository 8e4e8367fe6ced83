"""Authenticated endpoints with real guests in separate processes (issue 7).

Each refusal (no key, wrong key, a replayed hello, a plaintext peer against a TLS listener, a
TLS peer whose certificate comes from another CA, a control client of another user) must be
one line on both sides, and the source machine must keep running with its `verify` guest
passing. Migrations over PSK and over TLS, with --verify-memory, complete.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    KEY_FILE,
    Listener,
    MachineProcess,
    needs_kvm,
    run_cli,
    running_verify,
    wait_for,
)
from test_control import as_other_user, needs_root
from test_engine_security import relay
from test_migrate_failures import assert_source_healthy

from livemig.migration.credentials import make_tls_dir, write_key

pytestmark = needs_kvm


@pytest.fixture
def source(machines) -> MachineProcess:
    return running_verify(machines)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("pki")
    for name, ca in (("src", "ca"), ("dst", "ca"), ("evil", "evil-ca")):
        make_tls_dir(str(base / name), ca_dir=str(base / ca))
    return {n: str(base / n) for n in ("src", "dst", "evil")}


def one_line(text: str, fragment: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert "Traceback" not in text, text
    hits = [ln for ln in lines if fragment in ln]
    assert len(hits) == 1, (fragment, text)
    return hits[0]


def refused(src: MachineProcess, tmp: Path, listen_auth: list[str], migrate_auth: list[str],
            src_says: str, dst_says: str) -> None:
    dst = Listener(tmp, auth=listen_auth)
    res = run_cli("migrate", src.control, "--to", f"127.0.0.1:{dst.port}", *migrate_auth)
    assert res.returncode != 0
    line = one_line(res.stderr, src_says)
    assert "source machine" in line, line  # says which state the source is left in
    time.sleep(0.5)
    one_line(dst.terminate(), dst_says)
    assert_source_healthy(src)


def test_no_key(source: MachineProcess, tmp_path: Path) -> None:
    refused(source, tmp_path, ["--key-file", KEY_FILE], ["--insecure"],
            "requires a pre-shared key", "no pre-shared key")


def test_wrong_key(source: MachineProcess, tmp_path: Path) -> None:
    other = str(tmp_path / "other.key")
    write_key(other)
    refused(source, tmp_path, ["--key-file", KEY_FILE], ["--key-file", other],
            "could not prove the pre-shared key", "did not verify")


def test_plaintext_peer_against_tls_listener(source: MachineProcess, tmp_path: Path,
                                             pki: dict[str, str]) -> None:
    refused(source, tmp_path, ["--tls-dir", pki["dst"]], ["--key-file", KEY_FILE],
            "migration failed", "TLS handshake failed")


def test_tls_peer_from_another_ca(source: MachineProcess, tmp_path: Path,
                                  pki: dict[str, str]) -> None:
    refused(source, tmp_path, ["--tls-dir", pki["dst"]], ["--tls-dir", pki["evil"]],
            "TLS handshake failed", "TLS handshake failed")


class Recorder:
    """A relay that keeps what the source sent."""

    def __init__(self, port: int) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.sent = bytearray()
        threading.Thread(target=self._run, args=(port,), daemon=True).start()

    def _run(self, port: int) -> None:
        a, _ = self.srv.accept()
        b = socket.create_connection(("127.0.0.1", port))
        threading.Thread(target=relay, args=(b, a, None), daemon=True).start()
        relay(a, b, self.sent)


def test_replayed_hello(source: MachineProcess, tmp_path: Path) -> None:
    """Record an authenticated migration's opening (then cancel it: the source runs on), and
    play the recording to the listener again: its fresh nonce makes the old proof useless."""
    dst = Listener(tmp_path)
    rec = Recorder(dst.port)
    assert source.ctl("migrate", to=f"127.0.0.1:{rec.port}", key_file=KEY_FILE,
                      max_bandwidth="20M")["ok"]
    wait_for(lambda: len(rec.sent) > 100_000, 20, "the migration to get going")
    assert source.ctl("migrate-cancel")["ok"]
    wait_for(lambda: source.ctl("query-migrate")["status"] == "cancelled", 20, "the cancel")
    replay = Listener(tmp_path, name="replay")
    c = socket.create_connection(("127.0.0.1", replay.port))
    c.sendall(bytes(rec.sent[:4096]))
    c.settimeout(10)
    answer = b""
    while chunk := c.recv(1 << 16):  # WELCOME and AUTH first, then the ERROR, then the end
        answer += chunk
    c.close()
    assert b"authentication failed" in answer  # the replayer is told, in an ERROR record
    time.sleep(1)  # let the listener say it
    one_line(replay.terminate(), "did not verify")
    dst.terminate()
    assert_source_healthy(source)


@pytest.mark.parametrize("kind", ["psk", "tls"])
def test_authenticated_migration_with_verify_memory(source: MachineProcess, tmp_path: Path,
                                                    pki: dict[str, str], kind: str) -> None:
    listen_auth = ["--key-file", KEY_FILE] if kind == "psk" else ["--tls-dir", pki["dst"]]
    src_auth = ["--key-file", KEY_FILE] if kind == "psk" else ["--tls-dir", pki["src"]]
    dst = Listener(tmp_path, auth=listen_auth)
    res = run_cli("migrate", source.control, "--to", f"127.0.0.1:{dst.port}", *src_auth,
                  "--verify-memory", "--json")
    assert res.returncode == 0, res.stderr
    import json
    stats: dict[str, Any] = json.loads(res.stdout)
    assert stats["status"] == "completed" and stats["verified_memory"] is True, stats
    assert stats["security"] == kind
    wait_for(lambda: dst.ctl("status")["probe"]["counts"]["ok"] >= 1, 30,
             "a verify pass at the destination")
    assert int(dst.ctl("status")["probe"]["counts"]["fail"]) == 0
    dst.ctl("quit")
    dst.stop()


@needs_root
def test_control_client_of_another_user(source: MachineProcess) -> None:
    """A control client of another uid cannot reach the machine (one line, exit 2); the
    guest runs on. (test_control.py covers the SO_PEERCRED layer behind the directory.)"""
    res = as_other_user("ctl", source.control, "pause")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res
    one_line(res.stderr, source.control)
    assert source.ctl("status")["state"] == "running"
    assert_source_healthy(source)
