"""The destination side of a migration, as an explicit state machine.

    AWAIT_HELLO --HELLO (WELCOME sent)--> AWAIT_CONFIG
    AWAIT_CONFIG --CONFIG (machine built, CONFIG_OK sent)--> RECEIVING
    RECEIVING --PAGES | ROUND_END (ROUND_ACK sent) | VERIFY--> RECEIVING
    RECEIVING --STATE (loaded, memory verified, READY sent)--> READY
    READY --COMMIT (machine started, RUNNING sent, REPORT sent)--> RUNNING
    any state --ABORT--> ABORTED: the machine is closed
    any state --bad input--> FAILED: ERROR sent with the reason, the machine is closed
    READY --connection lost--> COMMIT_UNKNOWN: the machine is kept, paused

Only the records listed for a state are accepted there; anything else is a protocol error.
Nothing from the wire reaches the machine before it has been checked.
"""

from __future__ import annotations

import enum
import socket
import time
from collections.abc import Callable

import numpy as np

from livemig.contract import PAGE_SIZE, Machine, MachineConfig, MachineError, MachineState
from livemig.migration import hello as hello_mod
from livemig.migration import pages, records, scan
from livemig.migration.errors import (
    CommitUnconfirmed,
    ConnectionLost,
    MigrationError,
    ProtocolError,
    RemoteError,
)
from livemig.migration.prefault import Prefaulter
from livemig.migration.stats import MigrationStats, RoundStats
from livemig.migration.transport import tune
from livemig.migration.verify import VerifyTable
from livemig.migration.wire import Record, RecordReader, RecordType, send_record
from livemig.probe import ProbeKind

FIRST_HEARTBEAT_WAIT = 2.0  # seconds the destination waits for the guest's first heartbeat


class DestState(enum.Enum):
    """Where the destination is; see the module docstring for the transitions."""

    AWAIT_HELLO = "await-hello"
    AWAIT_CONFIG = "await-config"
    RECEIVING = "receiving"
    READY = "ready"
    RUNNING = "running"
    ABORTED = "aborted"
    FAILED = "failed"
    COMMIT_UNKNOWN = "commit-unknown"


ALLOWED: dict[DestState, set[RecordType]] = {
    DestState.AWAIT_HELLO: {RecordType.HELLO},
    DestState.AWAIT_CONFIG: {RecordType.CONFIG, RecordType.ABORT},
    DestState.RECEIVING: {
        RecordType.PAGES, RecordType.ROUND_END, RecordType.VERIFY, RecordType.STATE,
        RecordType.ABORT,
    },
    DestState.READY: {RecordType.COMMIT, RecordType.ABORT},
}


class Destination:
    """Receives one incoming migration on a connected socket."""

    def __init__(self, sock: socket.socket, build: Callable[[MachineConfig], Machine]) -> None:
        self.sock = sock
        self.build = build
        self.state = DestState.AWAIT_HELLO
        self.reader = RecordReader(sock)
        self.stats = MigrationStats()
        self.machine: Machine | None = None
        self.ram: np.ndarray | None = None
        self.prefault: Prefaulter | None = None
        self.encodings: set[pages.Encoding] = set()
        self.features: list[str] = []
        self.verify: VerifyTable | None = None
        self.round = RoundStats(1)
        self.source_probe: dict = {}
        self._t0 = time.monotonic()

    def run(self) -> tuple[Machine, MigrationStats]:
        """Receive until RUNNING; raises MigrationError (machine closed unless COMMIT_UNKNOWN)."""
        tune(self.sock)
        handlers = {
            RecordType.HELLO: self._on_hello, RecordType.CONFIG: self._on_config,
            RecordType.PAGES: self._on_pages, RecordType.ROUND_END: self._on_round_end,
            RecordType.VERIFY: self._on_verify, RecordType.STATE: self._on_state,
            RecordType.COMMIT: self._on_commit, RecordType.ABORT: self._on_abort,
        }
        try:
            while self.state is not DestState.RUNNING:
                rec = self.reader.read()
                if rec.type not in ALLOWED[self.state]:
                    raise ProtocolError(
                        f"{rec.type.name} record not allowed in state {self.state.value}"
                    )
                handlers[rec.type](rec)
        except MigrationError as e:
            self._fail(e)
            raise
        except MachineError as e:
            err = MigrationError(f"destination machine: {e}")
            self._fail(err)
            raise err from e
        except Exception as e:  # a bug must not leave the source waiting for nothing
            err = MigrationError(f"destination failed: {type(e).__name__}: {e}")
            self._fail(err)
            raise err from e
        assert self.machine is not None
        return self.machine, self.stats

    def _fail(self, e: MigrationError) -> None:
        self._stop_prefault()
        self.stats.error = str(e)
        if self.state is DestState.READY and isinstance(e, ConnectionLost):
            self.state = DestState.COMMIT_UNKNOWN
            self.stats.status = "commit-unknown"
            err = CommitUnconfirmed(
                f"connection lost after READY ({e}): the machine is kept paused here; the "
                "source may or may not have committed"
            )
            err.machine = self.machine  # type: ignore[attr-defined]
            raise err from e
        if not isinstance(e, (ConnectionLost, RemoteError)):
            try:
                send_record(self.sock, RecordType.ERROR, str(e).encode()[:4096])
                self._drain()
            except MigrationError:
                pass
        if self.state is not DestState.ABORTED:
            self.state = DestState.FAILED
        self.stats.status = self.state.value
        if self.machine is not None:
            self.machine.close()
            self.machine = None

    def _drain(self, timeout: float = 2.0) -> None:
        """Half-close, then read and drop until the source closes (or `timeout`): closing
        with unread input would send a reset, which can destroy the ERROR in flight."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(timeout)
            end = time.monotonic() + timeout
            while time.monotonic() < end and self.sock.recv(1 << 16):
                pass
        except OSError:
            pass

    def _on_hello(self, rec: Record) -> None:
        offer = hello_mod.Hello.decode(rec.payload)
        mine = hello_mod.Hello(encodings=list(pages.SUPPORTED))
        try:
            chosen = hello_mod.choose(offer, mine)
        except MigrationError:
            # Answer with our own versions so the source can say what went wrong.
            send_record(self.sock, RecordType.WELCOME, mine.encode())
            raise
        send_record(self.sock, RecordType.WELCOME, chosen.encode())
        self.encodings = pages.parse_encodings(chosen.encodings)
        self.features = chosen.features
        self.state = DestState.AWAIT_CONFIG

    def _on_config(self, rec: Record) -> None:
        d = records.unpack(rec.payload, "CONFIG", ("machine", "page_size"))
        if d["page_size"] != PAGE_SIZE:
            raise ProtocolError(f"source pages are {d['page_size']} bytes, here {PAGE_SIZE}")
        cfg = MachineConfig.from_dict(d["machine"])
        self.stats.mode = str(d.get("mode", ""))
        self.machine = self.build(cfg)
        self._start_prefault(d.get("populated"))
        view = np.frombuffer(self.machine.memory.view(), dtype=np.uint8)
        self.ram = view.reshape(-1, PAGE_SIZE)
        if hello_mod.FEATURE_VERIFY in self.features:
            self.verify = VerifyTable(len(self.ram))
        send_record(self.sock, RecordType.CONFIG_OK)
        self.stats.setup_ms = (time.monotonic() - self._t0) * 1000
        self.stats.status = "active"
        self.state = DestState.RECEIVING

    def _start_prefault(self, hint: object) -> None:
        """Populate the RAM ranges the source says hold data (a hint: ignored if malformed)."""
        assert self.machine is not None
        npages = self.machine.memory.size // PAGE_SIZE
        if not isinstance(hint, list):
            return
        runs = [(int(r[0]), int(r[1])) for r in hint
                if isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)]
        runs = [(a, n) for a, n in runs if 0 <= a < npages and 0 < n <= npages - a]
        if runs:
            self.prefault = Prefaulter(self.machine.memory.view(), runs)

    def _stop_prefault(self) -> None:
        if self.prefault is not None:
            self.prefault.stop()
            self.prefault = None

    def _on_pages(self, rec: Record) -> None:
        assert self.ram is not None
        batch = pages.decode(rec.payload, len(self.ram), self.encodings)
        pages.apply(batch, self.ram)
        for e in pages.Encoding:
            self.round.add(e.wire_name, batch.count(e))
        self.round.bytes_sent += len(rec.payload) + 16

    def _on_round_end(self, rec: Record) -> None:
        d = records.unpack(rec.payload, "ROUND_END", ("round",))
        self.stats.rounds.append(self.round)
        self.stats.bytes_sent += self.round.bytes_sent
        if hello_mod.FEATURE_ROUND_ACK in self.features:
            send_record(self.sock, RecordType.ROUND_ACK, records.pack({"round": d["round"]}))
        self.round = RoundStats(len(self.stats.rounds) + 1)

    def _on_verify(self, rec: Record) -> None:
        if self.verify is None:
            raise ProtocolError("VERIFY record but verify-memory was not negotiated")
        self.verify.add(rec.payload)

    def _on_state(self, rec: Record) -> None:
        assert self.machine is not None and self.ram is not None
        self._stop_prefault()
        d = records.unpack(rec.payload, "STATE", ("state",))
        if not isinstance(d["state"], bytes):
            raise ProtocolError("STATE record: state is not a byte string")
        state = MachineState.decode(d["state"])
        self.source_probe = d.get("probe") or {}
        if self.verify is not None:
            problem = self.verify.check(self.ram, scan.populated(self.machine.memory))
            if problem:
                raise MigrationError(problem + "; refusing to COMMIT")
            self.stats.verified_memory = True
        self.machine.load_state(state)
        send_record(self.sock, RecordType.READY)
        self.state = DestState.READY

    def _on_commit(self, rec: Record) -> None:
        assert self.machine is not None
        started = time.time()
        self.machine.start()
        send_record(self.sock, RecordType.RUNNING)
        self.state = DestState.RUNNING
        self.stats.status = "completed"
        self.stats.total_ms = (time.monotonic() - self._t0) * 1000
        if hello_mod.FEATURE_REPORT in self.features:
            beating = bool(self.source_probe.get("last_heartbeat"))
            first = self._first_heartbeat(started) if beating else None
            try:
                send_record(self.sock, RecordType.REPORT, records.pack({"first_heartbeat": first}))
            except MigrationError:
                pass

    def _first_heartbeat(self, since: float) -> float | None:
        assert self.machine is not None
        deadline = time.monotonic() + FIRST_HEARTBEAT_WAIT
        while time.monotonic() < deadline:
            for e in self.machine.probe.events(ProbeKind.HEARTBEAT):
                if e.time >= since:
                    return e.time
            time.sleep(0.002)
        return None

    def _on_abort(self, rec: Record) -> None:
        self.state = DestState.ABORTED
        raise RemoteError(f"source aborted the migration: {rec.text()}")


def receive(
    sock: socket.socket, build: Callable[[MachineConfig], Machine]
) -> tuple[Machine, MigrationStats]:
    """Receive one migration on `sock`; `build` makes an empty machine for the config.

    Returns the machine, running, once COMMIT has come and RUNNING was answered. Raises
    MigrationError otherwise (the machine built, if any, is closed), except CommitUnconfirmed
    whose `.machine` is the loaded, paused machine.
    """
    return Destination(sock, build).run()
