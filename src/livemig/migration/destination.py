"""The destination side of a migration, as an explicit state machine.

    (hello, AUTH: handshake.py)  --> AWAIT_CONFIG
    AWAIT_CONFIG --CONFIG (machine built, CONFIG_OK sent)--> RECEIVING
    RECEIVING --PAGES | ROUND_END (ROUND_ACK sent) | VERIFY--> RECEIVING
    RECEIVING --PREPARE (hybrid: owed pages unmapped ahead, PREPARED sent)--> RECEIVING
    RECEIVING --STATE (loaded, memory verified, READY sent)--> READY
    READY --COMMIT (outcome recorded, machine started, RUNNING, REPORT)--> RUNNING
          (from a file: the stream ends there, and the caller starts the machine)
    post-copy (STATE carried the pages owed): READY --COMMIT--> POSTCOPY (the guest runs,
          pages are pulled and pushed) --every owed page here, COMPLETE--> RUNNING
    POSTCOPY --a connection lost--> POSTCOPY_PAUSED (the guest waits on missing pages)
          --a `recover` connection, MISSING sent--> POSTCOPY
    any state --ABORT--> ABORTED: the machine is closed
    any state --bad input, idle past the timeout--> FAILED: ERROR sent, the machine is closed
    READY --connection lost, no COMMIT within the switch-over limit, or a resolve question
          first--> DISCARDED: the outcome "not committed" is recorded, the machine is closed

Only the records listed for a state are accepted there; anything else is a protocol error.
Nothing from the wire reaches the machine before it has been checked. A machine runs here
only after COMMIT, and only if the session was not given up first (resolve.Outcomes).
"""

from __future__ import annotations

import enum
import socket
import threading
import time
from collections.abc import Callable

import numpy as np

from livemig.contract import (
    PAGE_SIZE,
    BackingKind,
    Machine,
    MachineConfig,
    MachineError,
    MachineState,
    hold_device_ram,
    net_ports,
)
from livemig.migration import backing, faultpath, gil, handshake, hello, records, scan
from livemig.migration import pages as pages_mod
from livemig.migration.channels import Channel, Role, SocketChannel
from livemig.migration.codecs import SUPPORTED, CodecSet
from livemig.migration.direct import DirectReceiver
from livemig.migration.errors import (
    AuthError,
    ConnectionLost,
    InternalError,
    MigrationError,
    ProtocolError,
    RemoteError,
)
from livemig.migration.netforward import NetReceiver
from livemig.migration.pageserver import unpack_bitmap
from livemig.migration.postcopy_ahead import PrepareAhead
from livemig.migration.postcopy_dest import Links, PostcopyReceiver
from livemig.migration.prefault import Prefaulter
from livemig.migration.resolve import Outcomes
from livemig.migration.security import Security
from livemig.migration.session import Session
from livemig.migration.stats import MigrationStats, RoundStats
from livemig.migration.streams import DestStreams
from livemig.migration.verify import VerifyTable
from livemig.migration.wire import HEADER_SIZE, MAX_PAYLOAD, Header, Record, RecordType
from livemig.probe import ProbeKind
from livemig.rampool import RamPool

FIRST_HEARTBEAT_WAIT = 5.0  # seconds the destination waits for the guest's first heartbeat
IDLE_TIMEOUT = 60.0  # seconds without a record before an incoming migration is given up
COMMIT_MARGIN = 2.0  # seconds READY waits for COMMIT beyond the source's switch-over limit
DEFAULT_SWITCHOVER_S = 30.0
MAX_STREAMS = 16
JOIN_TIMEOUT = 10.0  # seconds an extra connection of a session may take to arrive
RECOVERY_WAIT = 24 * 3600.0  # seconds a paused post-copy waits for the source to reconnect


class DestState(enum.Enum):
    """Where the destination is; see the module docstring for the transitions."""

    AWAIT_HELLO = "await-hello"
    AWAIT_CONFIG = "await-config"
    RECEIVING = "receiving"
    READY = "ready"
    POSTCOPY = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    RUNNING = "running"
    ABORTED = "aborted"
    FAILED = "failed"
    DISCARDED = "discarded"


ALLOWED: dict[DestState, set[RecordType]] = {
    DestState.AWAIT_CONFIG: {RecordType.CONFIG, RecordType.ABORT},
    DestState.RECEIVING: {
        RecordType.PAGES, RecordType.ROUND_END, RecordType.VERIFY, RecordType.STATE,
        RecordType.PREPARE, RecordType.ABORT,
    },
    DestState.READY: {RecordType.COMMIT, RecordType.ABORT},
}


class Destination:
    """Receives one incoming migration of a negotiated session."""

    def __init__(self, sess: Session, build: Callable[[MachineConfig], Machine],
                 outcomes: Outcomes | None = None, idle_timeout: float = IDLE_TIMEOUT,
                 join: Callable[[str, float], Channel] | None = None,
                 log: Callable[[str], None] = lambda s: None,
                 templates_dir: str | None = None, ram_pool: RamPool | None = None) -> None:
        self.sess = sess
        self.templates_dir = templates_dir  # where TLM finds templates by content id
        self.ram_pool = ram_pool  # RAM allocated ahead (listen --prealloc)
        # Takes an extra connection of the session by label (page streams, urgent, recover)
        # within the timeout given.
        self.join = join
        self.log = log
        self.postcopy: PostcopyReceiver | None = None
        self.ahead: PrepareAhead | None = None  # hybrid: post-copy prepared before STATE
        self.placed = 0  # page batches placed (a head start holds while this stays)
        self.streams: DestStreams | None = None
        self.build = build
        self.outcomes = outcomes or Outcomes()
        self.idle_timeout = idle_timeout
        self.state = DestState.AWAIT_CONFIG
        self.stats = MigrationStats(security=sess.security, session=sess.id.hex())
        self.machine: Machine | None = None
        self.ram: np.ndarray | None = None
        self.placer: pages_mod.RamPlacer | None = None
        self.direct: DirectReceiver | None = None  # PAGES into RAM, before COMMIT only
        self.prefault: Prefaulter | None = None
        self.verify: VerifyTable | None = None
        self.round = RoundStats(1)
        self.source_probe: dict = {}
        self.net_chan: Channel | None = None  # frames forwarded after COMMIT (--soft-net)
        self.switchover_s = DEFAULT_SWITCHOVER_S
        self.ready_at = 0.0
        self._t0 = time.monotonic()

    def run(self) -> tuple[Machine, MigrationStats]:
        """Receive until RUNNING; raises MigrationError (and the machine is closed)."""
        with gil.quick_handoff():
            return self._run()

    def _run(self) -> tuple[Machine, MigrationStats]:
        handlers = {
            RecordType.CONFIG: self._on_config,
            RecordType.ROUND_END: self._on_round_end, RecordType.VERIFY: self._on_verify,
            RecordType.STATE: self._on_state, RecordType.COMMIT: self._on_commit,
            RecordType.PREPARE: self._on_prepare, RecordType.ABORT: self._on_abort,
        }
        try:
            while self.state is not DestState.RUNNING:
                deadline = self._deadline()
                head = self.sess.main.read_header(deadline)
                if head.type not in ALLOWED[self.state]:
                    raise ProtocolError(
                        f"{head.type.name} record not allowed in state {self.state.value}"
                    )
                if head.type is RecordType.PAGES:
                    self._on_pages(head, deadline)
                else:
                    handlers[head.type](self.sess.main.read_payload(head, deadline))
        except MigrationError as e:
            # Not `from e`: _fail returns e itself unless it rewords it, and an exception that
            # is its own cause is a reference cycle: it held the failed migration's frames,
            # buffers and machine until a full garbage collection. A reworded e has e as its
            # context.
            raise self._fail(e)  # noqa: B904
        except MachineError as e:
            raise self._fail(MigrationError(f"destination machine: {e}")) from e
        except Exception as e:  # a bug must not leave the source waiting for nothing
            raise self._fail(InternalError(f"{type(e).__name__}: {e}")) from e
        finally:
            self.sess.record_channels()
            self.stats.channels = self.sess.stats.channels
        assert self.machine is not None
        return self.machine, self.stats

    def _deadline(self) -> float | None:
        if self.sess.back is None:
            return None  # a file: it has all it will ever have
        if self.state is DestState.READY:
            return self.ready_at + self.switchover_s + COMMIT_MARGIN
        return time.monotonic() + self.idle_timeout

    def _send(self, rtype: RecordType, *parts: bytes | memoryview) -> None:
        """Answer the source (nothing to answer in a file)."""
        if self.sess.back is not None:
            self.sess.back.send(rtype, *parts, deadline=time.monotonic() + self.idle_timeout)

    def _fail(self, e: MigrationError) -> MigrationError:
        """Give everything up; returns the error to raise (reworded when the copy was
        discarded after READY)."""
        self._release_views()
        if self.postcopy is not None:
            self.postcopy.close()
            self.postcopy = None
        self.stats.error = str(e)
        if self.state is DestState.READY:
            asked = self.outcomes.get(self.sess.id) is False  # a resolve question came first
            self.outcomes.decide(self.sess.id, False)
            self.state = DestState.DISCARDED
            if asked:
                e = MigrationError("the source asked whether COMMIT had come, and it had not: "
                                   "the destination discarded its copy")
            elif not isinstance(e, InternalError):
                e = type(e)(f"{e}; READY was sent but COMMIT never came: the destination "
                            "discarded its copy")
            self.stats.error = str(e)
        elif self.state is not DestState.ABORTED:
            self.state = DestState.FAILED
        refuse(self.sess.back or self.sess.main, e)
        if self.net_chan is not None:
            self.net_chan.close()
            self.net_chan = None
        self.stats.status = self.state.value
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        e.stats = self.stats
        return e

    def _release_views(self) -> None:
        """Stop the page streams and drop every view of guest RAM, so that closing the
        machine frees it."""
        if self.streams is not None:
            self.streams.close()
            self.streams = None
        if self.prefault is not None:
            self.prefault.stop()
            self.prefault = None
        self.ram = None
        self.placer = None
        self.direct = None
        self.ahead = None

    def _on_config(self, rec: Record) -> None:
        d = records.unpack(rec.payload, "CONFIG", ("machine", "page_size"))
        if d["page_size"] != PAGE_SIZE:
            raise ProtocolError(f"source pages are {d['page_size']} bytes, here {PAGE_SIZE}")
        if not isinstance(d["machine"], dict):
            raise ProtocolError("CONFIG record: machine is not a map")
        cfg = MachineConfig.from_dict(d["machine"])
        limit = d.get("switchover_timeout_ms")
        if isinstance(limit, int | float) and 0 < limit < 3_600_000:
            self.switchover_s = limit / 1000
        self.stats.mode = str(d.get("mode", ""))
        self.sess.codecs.configure(d.get("codecs"))
        postcopy = d.get("postcopy") is True
        if postcopy and (self.join is None or hello.FEATURE_POSTCOPY not in self.sess.features):
            raise ProtocolError("post-copy was not negotiated")
        cfg.backing = backing.incoming(d.get("memory"), self.sess, self.templates_dir,
                                       postcopy, self.ram_pool, cfg.mem_size)
        self.machine = self.build(cfg)
        if cfg.backing.kind is BackingKind.PREPARED:
            self.log("the machine's RAM was allocated ahead (--prealloc)")
        # Post-copy pages are installed by userfaultfd, into holes; other backings hold their
        # data already.
        if not postcopy and cfg.backing.kind is BackingKind.FRESH:
            self._start_prefault(d.get("populated"))
        self.ram = np.frombuffer(self.machine.memory.view(), dtype=np.uint8).reshape(-1, PAGE_SIZE)
        self.placer = pages_mod.RamPlacer(self.ram)
        self.direct = DirectReceiver(self.ram, self.sess.codecs)
        if hello.FEATURE_VERIFY in self.sess.features:
            self.verify = VerifyTable(len(self.ram))
        nstreams = d.get("streams", 1)
        if not isinstance(nstreams, int) or not 1 <= nstreams <= MAX_STREAMS:
            raise ProtocolError(f"CONFIG record: streams must be 1..{MAX_STREAMS}")
        if nstreams > 1 and (self.join is None
                             or hello.FEATURE_STREAMS not in self.sess.features):
            raise ProtocolError("page streams were not negotiated")
        net = d.get("net", False) is True
        if net and (self.join is None or hello.FEATURE_NET not in self.sess.features):
            raise ProtocolError("network forwarding was not negotiated")
        self._send(RecordType.CONFIG_OK)
        if nstreams > 1:
            self._open_streams(nstreams)
        if postcopy:
            assert self.join is not None
            self.sess.urgent = self.join(Role.URGENT.value, JOIN_TIMEOUT)
        if net:
            assert self.join is not None
            self.net_chan = self.join(Role.NET.value, JOIN_TIMEOUT)
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

    def _open_streams(self, n: int) -> None:
        assert self.join is not None
        self.sess.pages = [self.join(f"pages-{i}", JOIN_TIMEOUT) for i in range(n)]
        for c in self.sess.pages:
            c.set_limit(MAX_PAYLOAD)
        self.streams = DestStreams(self.sess.pages, self._begin_batch)

    def _begin_batch(self, chan: Channel) -> Callable[[], None]:
        """A page stream's next batch: its tables now, its data in its turn."""
        assert self.direct is not None and chan.reader is not None
        head = chan.read_header()
        if head.type is not RecordType.PAGES:
            raise ProtocolError(f"{head.type.name} record on page stream {chan.label}")
        pending = self.direct.begin(chan.reader, head, None)
        reader, direct = chan.reader, self.direct
        return lambda: self._place(direct.finish(reader, pending, None), head.length)

    def _place(self, batch: pages_mod.DecodedBatch, length: int) -> None:
        assert self.placer is not None
        self.placed += 1
        pages_mod.apply(batch, self.sess.codecs, self.placer)
        self.round.bytes_sent += length + HEADER_SIZE
        counts = batch.counts()
        for codec in self.sess.codecs.codecs:
            self.round.add(codec.name, int(counts[codec.id]))

    def _on_pages(self, head: Header, deadline: float | None) -> None:
        if self.streams is not None:
            raise ProtocolError("PAGES on the main channel of a session with page streams")
        assert self.direct is not None and self.sess.main.reader is not None
        self._place(self.direct.read(self.sess.main.reader, head, deadline), head.length)

    def _on_round_end(self, rec: Record) -> None:
        d = records.unpack(rec.payload, "ROUND_END", ("round",))
        if self.streams is not None:
            batches = d.get("batches")
            if not isinstance(batches, int) or batches < 0:
                raise ProtocolError("ROUND_END record of a streamed session lacks batches")
            self.streams.wait_placed(batches, time.monotonic() + self.idle_timeout)
        self.stats.rounds.append(self.round)
        self.stats.bytes_sent += self.round.bytes_sent
        if hello.FEATURE_ROUND_ACK in self.sess.features:
            self._send(RecordType.ROUND_ACK, records.pack({"round": d["round"]}))
        self.round = RoundStats(len(self.stats.rounds) + 1)

    def _on_prepare(self, rec: Record) -> None:
        """Hybrid, the source's guest still running: unmap the pages it says will be owed,
        so that STATE finds little left to do (postcopy_ahead.py)."""
        assert self.machine is not None and self.ram is not None
        if self.sess.urgent is None or hello.FEATURE_PREPARE not in self.sess.features:
            raise ProtocolError("PREPARE record, but this is no post-copy")
        d = records.unpack(rec.payload, "PREPARE", ("round", "owed"))
        owed = unpack_bitmap(d["owed"], len(self.ram), "PREPARE record")
        if self.ahead is None or not self.ahead.valid(self.placed):
            self.ahead = PrepareAhead(self.machine.memory, self.placed)
        self.ahead.hint(owed)
        self._send(RecordType.PREPARED, records.pack({"round": d["round"]}))

    def _on_verify(self, rec: Record) -> None:
        if self.verify is None:
            raise ProtocolError("VERIFY record but verify-memory was not negotiated")
        self.verify.add(rec.payload)

    def _on_state(self, rec: Record) -> None:
        assert self.machine is not None and self.ram is not None
        if self.prefault is not None:
            self.prefault.stop()
            self.prefault = None
        d = records.unpack(rec.payload, "STATE", ("state",))
        if not isinstance(d["state"], bytes):
            raise ProtocolError("STATE record: state is not a byte string")
        probe = d.get("probe") or {}
        if not isinstance(probe, dict):
            raise ProtocolError("STATE record: probe is not a map")
        state = MachineState.decode(d["state"])
        self.source_probe = probe
        owed = None
        if "owed" in d:
            if self.sess.urgent is None:
                raise ProtocolError("STATE record names pages owed, but this is no post-copy")
            owed = unpack_bitmap(d["owed"], len(self.ram), "STATE record")
        if self.verify is not None:
            problem = self.verify.check(self.ram, scan.populated(self.machine.memory), owed)
            if problem:
                raise MigrationError(problem + "; refusing to COMMIT")
            self.stats.verified_memory = owed is None  # post-copy: once every page is here
        self.machine.load_state(state)
        if owed is not None:
            # never read from here on: a missing page would block this thread
            self.ram = self.direct = None
            self.postcopy = PostcopyReceiver(self.machine.memory, owed, self.verify, self._t0,
                                             self._urgent_requests(d))
            ahead = self.ahead if self.ahead and self.ahead.valid(self.placed) else None
            self.postcopy.prepare(ahead)
            if self.sess.back is not None and self.sess.urgent is not None:
                self.postcopy.arm(Links(self.sess.main, self.sess.urgent, self.sess.back))
        self._send(RecordType.READY)
        self.ready_at = time.monotonic()
        self.state = DestState.READY

    def _urgent_requests(self, state: dict[str, object]) -> bool:
        """Whether STATE moves page requests to the urgent connection (the C fault path on
        both sides: faultpath.py); refused where this side could not do it."""
        if state.get("urgent_requests") is not True:
            return False
        if not faultpath.usable(self.sess.features, self.verify is not None, self.sess.main,
                                self.sess.urgent):
            raise ProtocolError("STATE asks for page requests on the urgent connection, "
                                "which this migration cannot do")
        return True

    def _on_commit(self, rec: Record) -> None:
        assert self.machine is not None
        if not self.outcomes.decide(self.sess.id, True):
            raise MigrationError("COMMIT came after the migration was given up here")
        self._release_views()
        self.state = DestState.RUNNING
        if self.sess.back is None:
            return  # a file's COMMIT ends the stream: whoever restores starts the machine
        if self.postcopy is not None:
            self._run_postcopy()
            return
        started = time.time()
        self.machine.start()
        self._network_moved()
        self.stats.status = "completed"
        self.stats.total_ms = (time.monotonic() - self._t0) * 1000
        try:
            self._send(RecordType.RUNNING)
            self._report(started)
        except MigrationError:
            pass  # the machine runs here; the source learns it by resolving

    def _network_moved(self) -> None:
        """The machine runs here: tell the network, and inject what the source forwards."""
        assert self.machine is not None
        ports = net_ports(self.machine)
        for p in ports:
            p.announce()
        if self.net_chan is not None:
            NetReceiver(self.net_chan, ports).start()  # owns the channel from now on
            self.net_chan = None

    def _report(self, started: float) -> None:
        if hello.FEATURE_REPORT in self.sess.features:
            beating = bool(self.source_probe.get("last_heartbeat"))
            first = self._first_heartbeat(started) if beating else None
            self._send(RecordType.REPORT, records.pack({"first_heartbeat": first}))

    def _run_postcopy(self) -> None:
        """The guest runs while its pages come; returns once every owed page is here."""
        pc = self.postcopy
        assert pc is not None and self.machine is not None and self.sess.back is not None
        assert self.sess.urgent is not None
        self.state = DestState.POSTCOPY
        self.stats.status = "postcopy-active"
        pc.start(Links(self.sess.main, self.sess.urgent, self.sess.back))
        started = time.time()
        hold_device_ram(self.machine, True)  # until every page is here
        self.machine.start()
        self._network_moved()
        self._send(RecordType.RUNNING)
        report = threading.Thread(target=self._report_quietly, args=(started,),
                                  name="postcopy-report", daemon=True)
        report.start()  # the first heartbeat may take as long as the pages it needs
        while (lost := pc.wait()) is not None:
            if not isinstance(lost, ConnectionLost):
                raise lost
            self._await_recovery(pc, lost)
        pc.finish()
        hold_device_ram(self.machine, False)
        report.join(FIRST_HEARTBEAT_WAIT)  # the channels close when this returns
        self.stats.faults = pc.stats
        self.stats.bytes_sent += pc.bytes_received
        self.stats.verified_memory = True if self.verify is not None else None
        self.stats.total_ms = (time.monotonic() - self._t0) * 1000
        self.stats.status = "completed"
        self.state = DestState.RUNNING

    def _report_quietly(self, started: float) -> None:
        try:
            self._report(started)
        except MigrationError:
            pass

    def _await_recovery(self, pc: PostcopyReceiver, lost: MigrationError) -> None:
        """Keep everything and wait for the source's `recover` connection."""
        assert self.join is not None
        self.state = DestState.POSTCOPY_PAUSED
        self.stats.status = "postcopy-paused"
        self.log(f"post-copy paused: lost the source ({lost}); {pc.missing()} page(s) still "
                 "missing, and the guest waits on any it touches (it never runs on a hole); "
                 "waiting for `livemig migrate-recover` at the source")
        for c in self.sess.channels():
            c.close()
        main = self.join(Role.RECOVER.value, RECOVERY_WAIT)
        back = main if main.duplex else self.join(Role.RETURN.value, JOIN_TIMEOUT)
        urgent = self.join(Role.URGENT.value, JOIN_TIMEOUT)
        self.sess.main, self.sess.back, self.sess.urgent = main, back, urgent
        pc.reconnect(Links(main, urgent, back))
        self.state = DestState.POSTCOPY
        self.stats.status = "postcopy-active"
        self.log("post-copy recovered: the source reconnected")

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


def refuse(chan: Channel, e: MigrationError) -> None:
    """Tell the peer why (unless it went away, or told us, or the hello already answered),
    then let the ERROR reach it before the connection closes."""
    if isinstance(e, ConnectionLost | RemoteError | AuthError):
        return
    try:
        chan.send(RecordType.ERROR, str(e).encode()[:4096], deadline=time.monotonic() + 2)
    except MigrationError:
        return
    chan.drain()


def receive(sock: socket.socket | Channel, build: Callable[[MachineConfig], Machine],
            security: Security | None = None, outcomes: Outcomes | None = None,
            hello_timeout: float = 30.0) -> tuple[Machine, MigrationStats]:
    """Receive one migration on a connected socket or channel (its hello included); `build`
    makes an empty machine for the config.

    Returns the machine, running, once COMMIT has come and RUNNING was answered. Raises
    MigrationError otherwise; the machine built, if any, is closed.
    """
    chan = sock if isinstance(sock, Channel) else SocketChannel(sock)
    sec = security or Security.insecure()
    mine = hello.Hello(encodings=list(SUPPORTED))
    mine.features.remove(hello.FEATURE_STREAMS)  # no listener to take extra connections
    mine.features.remove(hello.FEATURE_POSTCOPY)
    mine.features.remove(hello.FEATURE_PREPARE)
    mine.features.remove(hello.FEATURE_NET)
    try:
        _offer, chosen = handshake.server(chan, mine, sec, time.monotonic() + hello_timeout)
    except MigrationError as e:
        refuse(chan, e)
        raise
    assert chosen.session is not None
    sess = Session(chosen.session, chosen.min_version, chosen.features,
                   CodecSet(chosen.encodings), chan, chan, sec.describe())
    return Destination(sess, build, outcomes).run()
