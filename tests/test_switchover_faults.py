"""Faults at the switch-over with real guests in separate processes (issue 8, defects 3, 4, 6).

A `livemig run` source with the `verify` workload migrates to a real `livemig listen` through
a relay in this test that parses the record stream as it passes (16-byte headers, the payload
length at offset 4) and hits one record of a chosen type, once, in one direction: it stalls
there, cuts the connection there, or drops it and everything after it (a black hole). Later
connections of the session (a resolve question) pass untouched. What must hold:

- a stalled link at READY or STATE pauses the guest for the switch-over limit, not for the
  stall; the source resumes, the destination discards its copy and never runs it (defect 4);
- READY lost in a cut: the source resumes, the listener discards its copy and takes the next
  migration of the same machine (defects 3, 6);
- COMMIT lost: the source asks the destination, which never got it and discards its copy:
  the source resumes; RUNNING lost: the destination runs the guest and the source ends. One
  copy runs, never two (defect 6).

Engine-level versions with a fake machine are in test_engine_security.py.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    AUTH,
    KEY_FILE,
    LIVEMIG,
    ROOT,
    MachineProcess,
    needs_kvm,
    running_verify,
    wait_for,
)
from test_migrate_failures import assert_source_healthy, final_status

from livemig.control import ControlError
from livemig.migration.wire import HEADER, HEADER_SIZE, MAGIC, RecordType

pytestmark = needs_kvm

FORWARD, BACK = "forward", "back"  # source -> destination, destination -> source
STALL_S = 30.0


class RecordRelay:
    """Relays every connection to `port`, parsing records; the first record of type `rtype`
    seen going `direction` (on any connection) meets `action`, once:

    - "stall": it and everything after it in that direction wait `seconds` (or `release`);
    - "cut": both directions of that connection are closed before it passes;
    - "drop": it and everything after it in that direction are read and thrown away, and the
      connection stays open (a black hole in one direction).
    """

    def __init__(self, port: int, direction: str, rtype: RecordType, action: str,
                 seconds: float = STALL_S) -> None:
        assert action in ("stall", "cut", "drop")
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.target = ("127.0.0.1", port)
        self.direction, self.rtype, self.action, self.seconds = direction, rtype, action, seconds
        self.fired = threading.Event()
        self.fired_at = 0.0
        self.release = threading.Event()  # ends a stall early: the link recovers
        self.passed: dict[str, list[RecordType]] = {FORWARD: [], BACK: []}
        self.connections = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.srv.accept()
                b = socket.create_connection(self.target)
            except OSError:
                return
            with self._lock:
                self._socks += [a, b]
                self.connections += 1
            threading.Thread(target=self._pump, args=(a, b, FORWARD, (a, b)), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, BACK, (a, b)), daemon=True).start()

    def _trigger(self, direction: str, rtype: int) -> bool:
        with self._lock:
            if self.fired.is_set() or direction != self.direction or rtype != self.rtype:
                return False
            self.fired_at = time.monotonic()
            self.fired.set()
            return True

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str,
              pair: tuple[socket.socket, socket.socket]) -> None:
        buf = bytearray()
        left = 0  # payload bytes of the current record still to pass
        rtype = 0
        dropping = False
        try:
            while data := src.recv(1 << 16):
                if dropping:
                    continue
                buf += data
                pos = 0
                done: list[RecordType] = []
                while pos < len(buf):
                    if left:
                        n = min(left, len(buf) - pos)
                        pos, left = pos + n, left - n
                        if not left:
                            done.append(RecordType(rtype))
                        continue
                    if len(buf) - pos < HEADER_SIZE:
                        break
                    magic, rtype, _flags, length, _, _ = HEADER.unpack_from(buf, pos)
                    if magic != MAGIC:
                        self.errors.append(f"{direction}: not a record header: {magic!r}")
                        raise OSError("lost the record boundaries")
                    if self._trigger(direction, rtype):
                        dst.sendall(buf[:pos])
                        self.passed[direction] += done
                        del buf[:pos]
                        pos, done = 0, []
                        if self.action == "cut":
                            for s in pair:
                                _close(s)
                            return
                        if self.action == "drop":
                            dropping = True
                            buf.clear()
                            break
                        self.release.wait(self.seconds)  # stall, then pass it on
                    pos += HEADER_SIZE
                    left = length
                    if not left:
                        done.append(RecordType(rtype))
                dst.sendall(buf[:pos])
                self.passed[direction] += done
                del buf[:pos]
        except OSError:
            pass
        if not dropping:  # pass the end on; the other direction may still carry an answer
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.release.set()
        _close(self.srv)
        with self._lock:
            for s in self._socks:
                _close(s)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


class Dest:
    """A `livemig listen` process on loopback (with `--once` or not); its stderr is read as
    it comes, so a test can wait for a line while it runs."""

    def __init__(self, tmp: Path, once: bool, name: str = "dst") -> None:
        self.control = str(tmp / f"{name}.sock")
        self.proc = subprocess.Popen(
            [*LIVEMIG, "listen", "--host", "127.0.0.1", "--port", "0",
             *(["--once"] if once else []), *AUTH, "--console", str(tmp / f"{name}.console"),
             "--control", self.control],
            stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stderr is not None
        first = self.proc.stderr.readline()
        m = re.search(r":(\d+)\s*$", first)
        assert m, f"listen did not say its port: {first!r}"
        self.port = int(m.group(1))
        self.lines: list[str] = [first]
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = 20.0) -> str:
        """The first line matching `pattern` (a regular expression)."""
        def find() -> str | None:
            return next((ln for ln in list(self.lines) if re.search(pattern, ln)), None)
        try:
            return str(wait_for(find, timeout, f"listen to say /{pattern}/"))
        except AssertionError:
            raise AssertionError(f"listen never said /{pattern}/; it said:\n{self.text}") from None

    def ctl(self, cmd: str, **kw: Any) -> dict[str, Any]:
        from livemig.control import request
        return request(self.control, cmd, **kw)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class StateWatch:
    """Polls a machine process's `status` and keeps every change of state (running/paused),
    with its time, until stopped or the process is gone."""

    def __init__(self, mp: MachineProcess, period: float = 0.05) -> None:
        self.mp, self.period = mp, period
        self.changes: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                state = str(self.mp.ctl("status", timeout=5)["state"])
            except ControlError:
                state = "gone"
            now = time.monotonic()
            if not self.changes or self.changes[-1][1] != state:
                self.changes.append((now, state))
            if state == "gone":
                return
            self._stop.wait(self.period)

    def stop(self, until: str | None = None) -> list[tuple[float, str]]:
        """Stop watching, once the last state seen is `until` (if given; 10 s at most)."""
        deadline = time.monotonic() + 10
        while until and (not self.changes or self.changes[-1][1] != until) \
                and time.monotonic() < deadline:
            time.sleep(self.period)
        self._stop.set()
        self._thread.join(10)
        return self.changes

    def paused_spans(self) -> list[float]:
        """How long each pause lasted, as seen from outside (a pause still on counts to now)."""
        spans, start = [], None
        for t, state in [*self.changes, (time.monotonic(), "end")]:
            if state == "paused" and start is None:
                start = t
            elif state != "paused" and start is not None:
                spans.append(t - start)
                start = None
        return spans

    def states_after_first_pause(self) -> list[str]:
        states = [s for _, s in self.changes]
        return states[states.index("paused"):] if "paused" in states else []


@pytest.fixture
def source(machines: Any) -> MachineProcess:
    return running_verify(machines)


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    """Relays and listeners to close at the end, whatever happens."""
    things: list[Any] = []
    yield things
    for t in reversed(things):
        t.close()


def event_ms(stats: dict[str, Any], name: str) -> float:
    return next(float(e["t_ms"]) for e in stats["events"] if e["event"] == name)


def assert_runs_at_destination(dst: Dest) -> None:
    """The received machine runs at the destination and its verify workload passes there."""
    wait_for(lambda: Path(dst.control).exists(), 20, "the destination's control socket")
    st = dst.ctl("status")
    assert st["state"] == "running" and st["error"] is None, st
    oks = st["probe"]["counts"].get("ok", 0)
    wait_for(lambda: dst.ctl("status")["probe"]["counts"].get("ok", 0) >= oks + 2, 30,
             "two verify passes at the destination")
    assert dst.ctl("status")["probe"]["counts"].get("fail", 0) == 0, dst.ctl("status")


# -- defect 4: a stalled link at the switch-over -----------------------------------------------


@pytest.mark.parametrize(("direction", "rtype", "timeout_arg", "limit"), [
    (BACK, RecordType.READY, [], 5.0),  # derived: max(5 s, 10 x 300 ms)
    (FORWARD, RecordType.STATE, ["--switchover-timeout", "3"], 3.0),
], ids=["READY-held", "STATE-held"])
def test_stalled_link_pauses_the_guest_only_for_the_limit(
        source: MachineProcess, tmp_path: Path, cleanup: list[Any], direction: str,
        rtype: RecordType, timeout_arg: list[str], limit: float) -> None:
    dst = Dest(tmp_path, once=True)
    relay = RecordRelay(dst.port, direction, rtype, "stall", STALL_S)
    cleanup += [dst, relay]
    watch = StateWatch(source)
    t0 = time.monotonic()
    out = subprocess.run(
        [*LIVEMIG, "migrate", source.control, "--to", f"127.0.0.1:{relay.port}", *AUTH,
         "--max-downtime", "300", *timeout_arg, "--json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    ended = time.monotonic()
    watch.stop(until="running")
    assert relay.fired.is_set(), f"no {rtype.name} went {direction}: {out.stdout}{out.stderr}"
    assert out.returncode == 1, out.stdout + out.stderr
    res = json.loads(out.stdout)
    assert res["status"] == "failed", res
    assert f"switch-over did not finish within {limit:.1f} s" in res["error"], res["error"]
    # It gave up at the limit, long before the stall would have ended.
    assert ended - t0 < 15 and ended - relay.fired_at < limit + 3, (ended - t0, res["events"])
    assert not relay.release.is_set()
    # The guest was paused for about the limit, by the engine's clock and seen from outside.
    paused_ms = event_ms(res, "source-resumed") - event_ms(res, "paused")
    assert paused_ms < (limit + 1) * 1000, res["events"]
    spans = watch.paused_spans()
    assert spans and max(spans) < limit + 2, (spans, watch.changes)
    assert_source_healthy(source)
    if direction == FORWARD:
        relay.release.set()  # the link recovers: STATE arrives at a destination given up on
    line = dst.wait_line(r"refused:", 20)
    assert "discarded its copy" in line or "aborted" in line, line
    assert dst.proc.wait(30) != 0, dst.text  # --once: it gave up, after lingering for resolve
    assert "machine running" not in dst.text, dst.text
    assert not Path(dst.control).exists()


# -- defects 3 and 6: READY lost in a cut; the listener serves the next migration -------------


def test_cut_at_ready_leaves_no_paused_copy_and_the_listener_takes_the_retry(
        source: MachineProcess, tmp_path: Path, cleanup: list[Any]) -> None:
    dst = Dest(tmp_path, once=False)
    relay = RecordRelay(dst.port, BACK, RecordType.READY, "cut")
    cleanup += [dst, relay]
    reply = source.ctl("migrate", to=f"127.0.0.1:{relay.port}", key_file=KEY_FILE)
    assert reply["ok"], reply
    q = final_status(source)
    assert relay.fired.is_set() and RecordType.READY not in relay.passed[BACK]
    assert q["status"] == "failed" and q["error"], q
    assert_source_healthy(source)
    line = dst.wait_line(r"refused:", 20)
    assert "discarded its copy" in line, line
    assert dst.proc.poll() is None, dst.text  # still listening, holding nothing

    # The same machine, to the same listener, directly: taken, and runs there.
    reply = source.ctl("migrate", to=f"127.0.0.1:{dst.port}", key_file=KEY_FILE)
    assert reply["ok"], reply
    q = final_status(source)
    assert q["status"] == "completed", q
    dst.wait_line(r"migration received, machine running", 20)
    assert_runs_at_destination(dst)
    source.proc.wait(15)  # the migrated-away source ends: one copy


# -- defect 6: COMMIT lost, RUNNING lost ------------------------------------------------------


def test_lost_commit_is_resolved_and_only_the_source_runs(
        source: MachineProcess, tmp_path: Path, cleanup: list[Any]) -> None:
    dst = Dest(tmp_path, once=True)
    relay = RecordRelay(dst.port, FORWARD, RecordType.COMMIT, "drop")
    cleanup += [dst, relay]
    watch = StateWatch(source)
    reply = source.ctl("migrate", to=f"127.0.0.1:{relay.port}", key_file=KEY_FILE,
                       commit_timeout_s=2)
    assert reply["ok"], reply
    q = final_status(source)
    watch.stop(until="running")
    assert relay.fired.is_set() and RecordType.COMMIT not in relay.passed[FORWARD]
    assert q["status"] == "failed", q
    assert "COMMIT never reached the destination, which discarded its copy" in q["error"], q
    events = [e["event"] for e in q["stats"]["events"]]
    assert events.index("commit") < events.index("running-unconfirmed") < \
        events.index("source-resumed"), events
    assert relay.connections == 2  # the migration, then the resolve question
    # Paused from the pause to the answer, then running: never resumed on a guess.
    assert watch.states_after_first_pause()[:2] == ["paused", "running"], watch.changes
    assert_source_healthy(source)
    dst.wait_line(r"resolve from .*: COMMIT never received", 10)
    line = dst.wait_line(r"refused:", 10)
    assert "discarded its copy" in line, line
    assert "machine running" not in dst.text and not Path(dst.control).exists(), dst.text


def test_lost_running_is_resolved_and_only_the_destination_runs(
        source: MachineProcess, tmp_path: Path, cleanup: list[Any]) -> None:
    dst = Dest(tmp_path, once=True)
    relay = RecordRelay(dst.port, BACK, RecordType.RUNNING, "drop")
    cleanup += [dst, relay]
    watch = StateWatch(source)
    reply = source.ctl("migrate", to=f"127.0.0.1:{relay.port}", key_file=KEY_FILE,
                       commit_timeout_s=2)
    assert reply["ok"], reply
    q = final_status(source)
    assert relay.fired.is_set() and RecordType.COMMIT in relay.passed[FORWARD]
    assert RecordType.RUNNING not in relay.passed[BACK]
    assert q["status"] == "completed", q
    # Resolved at once, without waiting for the REPORT that was lost with RUNNING.
    stats = q["stats"]
    assert event_ms(stats, "switchover-done") - event_ms(stats, "running-unconfirmed") < 2000, \
        stats["events"]
    assert relay.connections == 2
    source.proc.wait(15)  # the source host ends once its final status was read
    watch.stop()
    # Paused from the pause until the process ended: it never ran again.
    assert watch.states_after_first_pause() == ["paused", "gone"], watch.changes
    dst.wait_line(r"resolve from .*: COMMIT received", 10)
    dst.wait_line(r"migration received, machine running", 10)
    assert_runs_at_destination(dst)
