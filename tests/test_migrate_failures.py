"""Failed migrations of a real `verify` guest: the source machine keeps running and passing.

The source is a `livemig run` process; the migration is started on its control socket. Each
failure (cancel, destination killed, connection cut, corrupted record, wrong protocol version)
must leave the source running with its verify workload still reporting OK and never FAIL.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    KEY_FILE,
    Listener,
    MachineProcess,
    future_version_destination,
    image,
    needs_kvm,
    wait_for,
)
from test_migrate_engine import Proxy

pytestmark = needs_kvm

SLOW = "30M"  # bytes/s: slow enough that a failure lands mid-transfer


@pytest.fixture
def source(machines) -> MachineProcess:
    src = machines(["run", image("verify"), "--mem", "512M", "--vcpus", "2",
                    "--append", "wss=4M rate=1000"], "src")
    wait_for(lambda: src.ctl("status")["probe"]["counts"]["ok"] >= 1, 30, "a first verify pass")
    return src


def start_migration(src: MachineProcess, port: int, **opts: Any) -> None:
    reply = src.ctl("migrate", to=f"127.0.0.1:{port}", max_bandwidth=SLOW, key_file=KEY_FILE,
                    **opts)
    assert reply["ok"], reply


def final_status(src: MachineProcess, timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        q = src.ctl("query-migrate")
        return q if q["status"] not in ("setup", "active") else None
    return wait_for(done, timeout, "the migration to end")


def assert_source_healthy(src: MachineProcess) -> None:
    st = src.ctl("status")
    assert st["state"] == "running" and st["error"] is None, st
    oks = st["probe"]["counts"]["ok"]
    wait_for(lambda: src.ctl("status")["probe"]["counts"]["ok"] >= oks + 2, 30,
             "two more verify passes on the source")
    assert src.failures() == 0, src.ctl("status")["probe"]["first_failure"]


def test_cancel_mid_transfer(source: MachineProcess, tmp_path: Path) -> None:
    dst = Listener(tmp_path)
    start_migration(source, dst.port)
    wait_for(lambda: source.ctl("query-migrate")["status"] == "active", 20, "transfer")
    assert source.ctl("migrate-cancel")["ok"]
    q = final_status(source)
    assert q["status"] == "cancelled", q
    assert "refused" in dst.stop() or dst.proc.returncode != 0
    assert_source_healthy(source)


def test_destination_killed_mid_transfer(source: MachineProcess, tmp_path: Path) -> None:
    dst = Listener(tmp_path)
    start_migration(source, dst.port)
    wait_for(lambda: source.ctl("query-migrate")["status"] == "active", 20, "transfer")
    dst.proc.send_signal(signal.SIGKILL)
    q = final_status(source)
    assert q["status"] == "failed" and q["error"], q
    dst.stop()
    assert_source_healthy(source)


def test_connection_cut(source: MachineProcess, tmp_path: Path) -> None:
    dst = Listener(tmp_path)
    relay = Proxy(("127.0.0.1", dst.port), cut_at=2 << 20)
    start_migration(source, relay.addr[1])
    q = final_status(source)
    assert q["status"] == "failed" and q["error"], q
    dst.stop()
    assert_source_healthy(source)


def test_corrupted_record_is_refused(source: MachineProcess, tmp_path: Path) -> None:
    dst = Listener(tmp_path)
    relay = Proxy(("127.0.0.1", dst.port), corrupt_at=1 << 20)
    start_migration(source, relay.addr[1])
    q = final_status(source)
    assert q["status"] == "failed", q
    assert "CRC mismatch" in q["error"], q["error"]  # the destination's reason, sent back
    assert "CRC mismatch" in dst.stop()
    assert_source_healthy(source)


def test_destination_with_wrong_protocol_version(source: MachineProcess) -> None:
    start_migration(source, future_version_destination()[1])
    q = final_status(source)
    assert q["status"] == "failed" and "protocol version 99" in q["error"], q
    assert_source_healthy(source)
