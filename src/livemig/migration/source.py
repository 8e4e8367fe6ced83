"""The source side of a migration: one driver for every strategy, as a state machine.

    CONNECTED --hello (+ AUTH)--> NEGOTIATED --CONFIG/CONFIG_OK--> CONFIGURED
    CONFIGURED --strategy.live_copy--> ITERATING --pause--> SWITCHOVER
    SWITCHOVER --last pages, VERIFY, STATE; READY--> READY --COMMIT--> COMMITTED
    COMMITTED --RUNNING--> COMPLETED (strategy.after_commit runs here)
    post-copy: COMMITTED --RUNNING--> POSTCOPY (page server) --COMPLETE--> COMPLETED
        POSTCOPY --link lost--> POSTCOPY_PAUSED --migrate-recover--> POSTCOPY
    before COMMITTED: failure --> FAILED, cancel --> CANCELLED (ABORT sent, source resumed)
    SWITCHOVER longer than the switch-over limit --> FAILED (aborted, source resumed)
    COMMITTED --no RUNNING--> resolve: ask the destination on a new connection;
        it never got COMMIT --> FAILED (source resumed); it did --> COMPLETED;
        no answer --> COMMIT_UNCONFIRMED (source stays paused; `migrate-resolve` later)

After COMMIT the source never resumes by itself unless the destination has said, on an
authenticated connection, that it never received COMMIT and has discarded its copy.
"""

from __future__ import annotations

import enum
import queue
import socket
import threading
import time
from collections.abc import Callable

import numpy as np

from livemig.contract import PAGE_SIZE, Machine, net_ports
from livemig.extents import runs
from livemig.migration import (
    gil,
    records,
    redirtied,
    resolve,
    scan,
    session,
    strategies,
    verify,
)
from livemig.migration import hello as hello_mod
from livemig.migration.channels import Channel, Role, SocketChannel
from livemig.migration.convergence import PAGE_OVERHEAD
from livemig.migration.errors import (
    Cancelled,
    CommitUnconfirmed,
    ConnectionLost,
    MigrationError,
    SwitchoverTimeout,
)
from livemig.migration.gap import guest_gap_ms
from livemig.migration.netforward import NetSender
from livemig.migration.options import MigrationOptions, Mode
from livemig.migration.pages import MAX_BATCH, BatchEncoder, EncodedBatch
from livemig.migration.pageserver import pack_bitmap, unpack_bitmap
from livemig.migration.ratelimit import RateLimiter
from livemig.migration.returnpath import ReturnPath
from livemig.migration.security import Security
from livemig.migration.stats import MigrationStats, Progress, RoundStats
from livemig.migration.streams import SourceStreams
from livemig.migration.wire import Record, RecordType

# The longest the source waits, before the pause, for the destination to place the last live
# round (ROUND_ACK): a backlog in socket buffers takes tens of ms, a stuck peer longer.
CATCH_UP_LIMIT_S = 1.0
SCAN_CHUNK = 32768  # pages scanned for zeroes at a time in the first round (128 MiB)
PROGRESS_EVERY = 0.05  # seconds between progress callbacks
HELLO_TIMEOUT = 30.0  # seconds for the destination's WELCOME, proofs and CONFIG_OK
ABORT_GRACE = 1.0  # seconds an ABORT may take to go out on a failing link
REPORT_WAIT = 8.0  # seconds for REPORT: the destination waits up to 5 s for a first heartbeat


class SourceState(enum.Enum):
    """Where the source is; see the module docstring for the transitions."""

    CONNECTED = "connected"
    NEGOTIATED = "negotiated"
    CONFIGURED = "configured"
    ITERATING = "iterating"
    SWITCHOVER = "switchover"
    READY = "ready"
    COMMITTED = "committed"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    COMMIT_UNCONFIRMED = "commit-unconfirmed"
    POSTCOPY = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"


class Source:
    """Runs one outgoing migration of `machine` over `main` (a connected channel, or a file
    channel for a snapshot); `redial` opens further connections to the same destination."""

    def __init__(self, machine: Machine, main: Channel, opts: MigrationOptions,
                 progress: Callable[[Progress], None] | None = None,
                 cancel: threading.Event | None = None, security: Security | None = None,
                 redial: session.Redial | None = None, to_file: bool = False) -> None:
        self.m = machine
        self.main = main
        self._caller_main = main  # closed by the caller; recovery may replace `main`
        self.start_postcopy = threading.Event()  # hybrid: switch now (migrate-start-postcopy)
        self._recover: queue.Queue[session.Redial | None] = queue.Queue()
        self.opts = opts
        self.progress = progress
        self.cancel = cancel or threading.Event()
        self.security = security or Security.insecure()
        self.redial = redial
        self.to_file = to_file
        self.strategy = strategies.for_mode(opts.mode)
        self.state = SourceState.CONNECTED
        self.stats = MigrationStats(mode=opts.mode.value, security=self.security.describe())
        self.session: session.Session | None = None
        self.ret: ReturnPath | None = None
        self.streams: SourceStreams | None = None
        self.limiter = RateLimiter(None if to_file else opts.max_bandwidth)
        self.ram = np.frombuffer(machine.memory.view(), dtype=np.uint8).reshape(-1, PAGE_SIZE)
        self.encoder: BatchEncoder | None = None
        self.net_chan: Channel | None = None  # soft network handover (netforward.py)
        self.net: NetSender | None = None
        self.paused = False
        self.deadline: float | None = None  # while paused: when the switch-over must give up
        self.running_lost = False  # RUNNING never came; a resolve said the machine runs there
        self.config_due: float | None = None  # CONFIG sent, CONFIG_OK not yet seen: by when
        self.live_bytes = 0
        self.live_pages = 0
        self.live_time = 0.0
        self.throttle = 0.0
        self._last_progress = 0.0
        self._t0 = self._phase_t = self._step_t = self._paused_at = time.monotonic()
        self._wall0 = time.time()

    # -- driver ---------------------------------------------------------------------------

    def run(self) -> MigrationStats:
        """Migrate; returns the stats or raises MigrationError carrying them as `.stats`."""
        with gil.quick_handoff():
            return self._run()

    def _run(self) -> MigrationStats:
        self._t0, self._wall0 = time.monotonic(), time.time()
        self._phase_t = self._t0
        try:
            self._negotiate()
            self._configure()
            self._phase("setup")
            self.stats.setup_ms = self.stats.phases_ms["setup"]
            self.stats.status = "active"
            self.state = SourceState.ITERATING
            self.strategy.live_copy(self)
            if not self.paused:
                self._catch_up()
            self._phase("live-copy")
            if not self.paused:
                self.pause()
            final = self.strategy.final_pages(self)
            self.send_round(len(self.stats.rounds) + 1, final)
            self.step("last-round")
            self._switchover()
            self._phase("switchover")
            self.strategy.after_commit(self)
            self._phase("after-commit")
            self._finish_net()
            self.state = SourceState.COMPLETED
            self.stats.status = "completed"
            self._finish_report()
        except MigrationError as e:
            self._fail(e)
            e.stats = self.stats
            raise
        except Exception as e:  # a bug or a machine error: still never leave the guest paused
            err = MigrationError(f"migration failed: {type(e).__name__}: {e}", self.stats)
            self._fail(err)
            raise err from e
        finally:
            if self.streams is not None:
                self.streams.close()
            self._record_channels()
            self._close_extra_channels()
            if self.net is None and self.net_chan is not None:
                self.net_chan.close()
        return self.stats

    def _close_extra_channels(self) -> None:
        """The connections this migration opened besides `main` (which is the caller's)."""
        if self.session is not None:
            for c in self.session.channels():
                if c is not self._caller_main:
                    c.close()

    def _phase(self, name: str) -> None:
        now = time.monotonic()
        self.stats.phases_ms[name] = (now - self._phase_t) * 1000
        self._phase_t = now
        self.stats.event(f"{name}-done")

    def step(self, name: str) -> None:
        """Close the current switch-over step (timed since the previous one)."""
        now = time.monotonic()
        self.stats.switchover_ms[name] = (now - self._step_t) * 1000
        self._step_t = now

    def _ms(self) -> float:
        return (time.monotonic() - self._t0) * 1000

    def elapsed_ms(self) -> float:
        """Milliseconds since the migration started."""
        return self._ms()

    def _record_channels(self) -> None:
        if self.session is not None:
            self.session.record_channels()
            self.stats.channels = self.session.stats.channels
            self.stats.codec_counters = self.session.codecs.stats()

    def _fail(self, e: MigrationError) -> None:
        """Leave the source as it must be after `e`, and record why."""
        self.stats.total_ms = self._ms()
        self.stats.error = str(e)
        self.stats.event("failed")
        if self.state in (SourceState.COMMITTED, SourceState.COMPLETED, SourceState.POSTCOPY,
                          SourceState.POSTCOPY_PAUSED):
            self.state = SourceState.COMMIT_UNCONFIRMED
            self.stats.status = "commit-unconfirmed"
            return
        self.state = SourceState.CANCELLED if isinstance(e, Cancelled) else SourceState.FAILED
        self.stats.status = self.state.value
        self._restore_source()  # first: nothing runs at the destination without COMMIT
        if not isinstance(e, ConnectionLost) or isinstance(e, SwitchoverTimeout):
            try:
                self.main.send(RecordType.ABORT, str(e).encode()[:4096],
                               deadline=time.monotonic() + ABORT_GRACE)
            except MigrationError:
                pass

    def _restore_source(self) -> None:
        try:
            self.m.memory.stop_dirty_log()
        except Exception:
            pass
        self.set_throttle(0.0)
        if self.paused:
            self.m.resume()
            self.paused = False
            self.stats.event("source-resumed")

    # -- setup ----------------------------------------------------------------------------

    def _negotiate(self) -> None:
        proposal = session.offer(self.opts)
        self.strategy.offer(self, proposal)
        deadline = time.monotonic() + HELLO_TIMEOUT
        if self.to_file and self.strategy.postcopy:
            raise MigrationError("a snapshot cannot be taken with post-copy")
        if self.to_file:
            self.session = session.open_file_writer(self.main, proposal, self.opts)
        else:
            self.session = session.open_source(self.main, self.security, proposal, self.redial,
                                               deadline, self.opts)
            self.ret = ReturnPath(self.session.back or self.main)
            self.ret.start()
            if (self.opts.verify_memory
                    and hello_mod.FEATURE_VERIFY not in self.session.features):
                raise MigrationError("destination does not support --verify-memory")
            if self.strategy.postcopy and (
                    hello_mod.FEATURE_POSTCOPY not in self.session.features
                    or self.redial is None):
                raise MigrationError("destination does not accept --mode "
                                     f"{self.opts.mode.value} (post-copy)")
        self.encoder = BatchEncoder(self.ram, self.session.codecs,
                                    buffers=1 if self._nstreams() == 1 else 3 * self._nstreams())
        self.stats.session = self.session.id.hex()
        self.state = SourceState.NEGOTIATED
        self.stats.event("negotiated")

    def _configure(self) -> None:
        # "populated": where RAM holds data, a hint for the destination's prefaulting.
        cfg = {"machine": self.m.config.to_dict(), "page_size": PAGE_SIZE,
               "mode": self.opts.mode.value, "streams": self._nstreams(),
               "postcopy": self.strategy.postcopy,
               "switchover_timeout_ms": self.opts.switchover_limit_s() * 1000,
               "codecs": self.session.codecs.params() if self.session else {},
               "populated": [list(r) for r in runs(scan.populated(self.m.memory))]}
        soft_net = self._soft_net()
        if soft_net:
            cfg["net"] = True
        extra, fds = self.strategy.configure(self)
        cfg |= extra
        if fds:  # the machine's RAM itself, to a process on this host
            self.stats.bytes_sent += self.main.send_with_fds(RecordType.CONFIG,
                                                             records.pack(cfg), fds=fds)
        else:
            self.send(RecordType.CONFIG, records.pack(cfg))
        plain = self.opts.mode in (Mode.PRECOPY, Mode.STOP_COPY) and not fds and not soft_net
        if plain and self._nstreams() == 1 and self.ret is not None:
            # Pipelined: the first pages go right behind CONFIG while the destination builds
            # its machine; CONFIG_OK is taken when it comes, at the latest before the pause.
            self.config_due = time.monotonic() + HELLO_TIMEOUT
        else:
            self.expect(RecordType.CONFIG_OK, time.monotonic() + HELLO_TIMEOUT)
        if self._nstreams() > 1:
            self._open_streams()
        if self.strategy.postcopy:
            self._join_urgent(time.monotonic() + HELLO_TIMEOUT)
        if soft_net:
            assert self.session is not None and self.redial is not None
            self.net_chan = session.join(self.session, session.offer(self.opts), self.redial,
                                         Role.NET, Role.NET.value, self.security,
                                         time.monotonic() + HELLO_TIMEOUT)
        self.state = SourceState.CONFIGURED

    def _join_urgent(self, deadline: float) -> None:
        """Post-copy: the connection that carries the pages faults ask for."""
        assert self.session is not None and self.redial is not None
        self.session.urgent = session.join(self.session, session.offer(self.opts), self.redial,
                                           Role.URGENT, Role.URGENT.value, self.security,
                                           deadline)

    def _soft_net(self) -> bool:
        """Forward frames after COMMIT: asked for, possible here and accepted there."""
        return (self.opts.soft_net and not self.to_file and self.redial is not None
                and self.session is not None
                and hello_mod.FEATURE_NET in self.session.features
                and bool(net_ports(self.m)))

    def _finish_net(self) -> None:
        if self.net is not None:
            self.stats.net = self.net.finish().to_json()
            self.stats.event("net-forward-done")

    def _nstreams(self) -> int:
        return 1 if self.to_file else self.opts.streams

    def _open_streams(self) -> None:
        """After CONFIG_OK: one connection per page stream, each with its own hello."""
        assert self.session is not None and self.encoder is not None
        if hello_mod.FEATURE_STREAMS not in self.session.features:
            raise MigrationError("destination does not accept page streams (--streams)")
        if self.redial is None:
            raise MigrationError("page streams need a destination address to dial")
        deadline = time.monotonic() + HELLO_TIMEOUT
        proposal = session.offer(self.opts)
        for i in range(self.opts.streams):
            self.session.pages.append(session.join(self.session, proposal, self.redial,
                                                   Role.PAGES, f"pages-{i}", self.security,
                                                   deadline))
        self.streams = SourceStreams(self.session.pages, self.encoder.release)

    # -- what strategies use --------------------------------------------------------------

    def check(self) -> None:
        """Raise if the migration was cancelled or the destination reported a failure."""
        if self.cancel.is_set():
            raise Cancelled("migration cancelled; the source machine keeps running")
        if self.ret is not None:
            self.ret.check()
        if self.streams is not None:
            self.streams.check()
        if self.config_due is not None and self.ret is not None:
            if self.ret.poll(RecordType.CONFIG_OK) is not None:
                self.config_due = None
            elif time.monotonic() > self.config_due:
                raise ConnectionLost("destination did not answer CONFIG in time")
        if self.deadline is not None and time.monotonic() > self.deadline:
            self._switchover_timeout()

    def _settle_config(self) -> None:
        """Wait for a pipelined CONFIG's CONFIG_OK (before anything that needs the
        destination's machine: pausing the guest)."""
        if self.config_due is not None:
            self.expect(RecordType.CONFIG_OK, self.config_due)
            self.config_due = None

    def _switchover_timeout(self) -> None:
        raise SwitchoverTimeout(
            f"switch-over did not finish within {self.opts.switchover_limit_s():.1f} s "
            "(link stalled?): aborted before COMMIT"
        )

    def send(self, rtype: RecordType, *parts: bytes | memoryview) -> int:
        """Send one record on the main channel; while paused, never past the deadline."""
        try:
            # until CONFIG_OK, a destination that takes nothing is given up as in the hello
            n = self.main.send(rtype, *parts, deadline=self.deadline or self.config_due)
        except ConnectionLost as e:
            if self.ret is not None:
                self.ret.settle()
                self.ret.check()  # prefer the destination's own reason, if it gave one
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self._switchover_timeout()
            raise e
        self.stats.bytes_sent += n
        return n

    def expect(self, rtype: RecordType, deadline: float) -> None:
        """Wait for the destination's `rtype` (nothing to wait for in a file)."""
        if self.ret is not None:
            self.ret.expect(rtype, deadline)

    def page_bandwidth(self) -> float:
        """The live rounds' rate in bytes/s as if every page went raw: pages sent per second
        times a raw page's size on the wire. A prediction of how long pages take must count
        pages, not bytes: a compressing codec sends few bytes per page but costs CPU time."""
        if not self.live_time:
            return 0.0
        return self.live_pages * (PAGE_SIZE + PAGE_OVERHEAD) / self.live_time

    def set_throttle(self, fraction: float) -> None:
        if fraction != self.throttle:
            self.m.set_throttle(fraction)
            self.throttle = fraction
            self.stats.throttle = max(self.stats.throttle, fraction)

    def _catch_up(self) -> None:
        """Before the pause, let the destination place the last live round: what is still in
        socket buffers then would otherwise be placed while the guest is paused (tens of ms
        at the end of a large round). The guest runs meanwhile; what it dirties goes in the
        final round. Bounded: a destination that does not answer in time is not waited for."""
        if (not self.stats.rounds or self.ret is None or self.session is None
                or hello_mod.FEATURE_ROUND_ACK not in self.session.features):
            return
        t = time.monotonic()
        caught_up = self.ret.wait_acked(self.stats.rounds[-1].number, CATCH_UP_LIMIT_S)
        self.check()
        waited = (time.monotonic() - t) * 1000
        self.stats.event(f"caught-up:{waited:.1f}ms" if caught_up else "catch-up-timeout")

    def pause(self) -> None:
        """Pause the guest; from now on the switch-over limit runs."""
        self._settle_config()
        self._step_t = time.monotonic()
        self.m.pause()
        self.paused = True
        self._paused_at = time.monotonic()
        if not self.to_file:  # a file takes as long as the disk does
            self.deadline = self._paused_at + self.opts.switchover_limit_s()
        self.stats.event("paused")
        self.step("pause")
        self.state = SourceState.SWITCHOVER

    def send_round(self, number: int, idx: np.ndarray | None,
                   keep: Callable[[np.ndarray], np.ndarray] | None = None) -> RoundStats:
        """Send one round: pages `idx`, or every non-zero page when None; `keep`, when given,
        filters each window of pages just before it goes (redirtied.py)."""
        rs = RoundStats(number, throttle=self.throttle)
        self.stats.rounds.append(rs)
        t = time.monotonic()
        if idx is None:
            for nz in scan.iter_nonzero(self.ram, scan.populated(self.m.memory), SCAN_CHUNK):
                self._send_pages(nz, rs, keep)
        else:
            self._send_pages(idx, rs, keep)
        end: dict[str, int] = {"round": number, "pages": sum(rs.pages.values())}
        if self.streams is not None:
            self.streams.flush()
            end["batches"] = self.streams.sent
        self.send(RecordType.ROUND_END, records.pack(end))
        rs.duration_ms = (time.monotonic() - t) * 1000
        return rs

    def _send_pages(self, idx: np.ndarray, rs: RoundStats,
                    keep: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        step = redirtied.WINDOW
        for w in range(0, len(idx), step):
            window = idx[w : w + step]
            if keep is not None:
                window = keep(window)
            for i in range(0, len(window), MAX_BATCH):
                self._send_batch_of(window[i : i + MAX_BATCH], rs)
            self._report(rs, min(w + step, len(idx)), len(idx))

    def _send_batch_of(self, idx: np.ndarray, rs: RoundStats) -> None:
        assert self.encoder is not None
        self.check()
        b = self.encoder.encode(idx, frozen=self.paused)
        n = self._send_batch(b)
        rs.bytes_sent += n
        for name, count in b.by_codec.items():
            rs.add(name, count)
            self.stats.codec_bytes[name] = (self.stats.codec_bytes.get(name, 0)
                                            + b.bytes_by_codec[name])
        self.limiter.spent(n, self._cap_wake)

    def _cap_wake(self) -> bool:
        """While --max-bandwidth holds a batch back: raise on a cancel or a broken link."""
        self.check()
        return False

    def _send_batch(self, b: EncodedBatch) -> int:
        """One PAGES record: on the main channel, or queued on its page stream."""
        assert self.encoder is not None
        if self.streams is None:
            try:
                return self.send(RecordType.PAGES, b.meta, *b.data)
            finally:
                self.encoder.release(b)
        n = b.wire_size
        self.streams.send(b, self.deadline)
        self.stats.bytes_sent += n
        return n

    def _report(self, rs: RoundStats, done: int, total: int) -> None:
        now = time.monotonic()
        if self.progress is None or (now - self._last_progress < PROGRESS_EVERY and done < total):
            return
        self._last_progress = now
        bw = self.live_bytes / self.live_time if self.live_time else 0.0
        phase = "switchover" if self.paused else "round"
        self.progress(Progress(phase, rs.number, self.stats.bytes_sent, done, total, bw,
                               self.throttle))

    # -- switch-over ----------------------------------------------------------------------

    def _switchover(self) -> None:
        if self.opts.verify_memory:
            self._send_verify()
            self.step("verify")
        self.check()
        st = self.m.save_state()
        payload = {"state": st.encode(), "probe": self.m.probe.state()}
        self.step("save-state")
        owed = self.strategy.owed_pages(self)
        if owed is not None:
            payload["owed"] = pack_bitmap(owed)
            self.stats.event("postcopy")
        payload.update(self.strategy.state_fields(self))
        self.send(RecordType.STATE, records.pack(payload))
        self.stats.state_sent_ms = (time.monotonic() - self._paused_at) * 1000
        self.strategy.state_sent(self)
        try:
            self.expect(RecordType.READY, self.deadline or time.monotonic())
        except ConnectionLost:
            self.check()  # a passed deadline says so; anything else goes as it is
            raise
        self.step("until-ready")
        self.state = SourceState.READY
        if self.cancel.is_set():
            raise Cancelled("migration cancelled before COMMIT; the source machine resumes")
        self.state = SourceState.COMMITTED  # from here on the source never resumes by itself
        self.stats.event("commit")
        self.deadline = None
        self.send(RecordType.COMMIT)
        if self.net_chan is not None:  # from now on the frames belong to the destination
            self.net = NetSender(self.net_chan, net_ports(self.m))
            self.net.start()
        self._await_running()
        self.step("until-running")
        self.stats.downtime_ms = (time.monotonic() - self._paused_at) * 1000
        self.stats.total_ms = self._ms()
        if owed is not None:
            self.state = SourceState.POSTCOPY
            self.stats.status = "postcopy-active"
            return  # verified (or not) once the last page has arrived
        self.state = SourceState.COMPLETED
        self.stats.status = "completed"
        if self.opts.verify_memory:
            self.stats.verified_memory = True

    def _await_running(self) -> None:
        if self.to_file:
            return
        try:
            self.expect(RecordType.RUNNING, time.monotonic() + self.opts.commit_timeout_s)
            return
        except MigrationError as e:
            lost = e
        self.stats.event("running-unconfirmed")
        committed = self._resolve()
        if committed is None:
            raise CommitUnconfirmed(
                f"COMMIT sent but the destination never confirmed RUNNING ({lost}); both sides "
                "stay paused: run `livemig ctl SOCK migrate-resolve` once the destination is "
                "reachable", self.stats) from lost
        if not committed:
            self.state = SourceState.SWITCHOVER  # the destination discarded: safe to resume
            raise MigrationError("COMMIT never reached the destination, which discarded its "
                                 "copy", self.stats) from lost
        self.running_lost = True  # and the REPORT that follows RUNNING with it

    # -- post-copy: a broken link, and recovery ---------------------------------------------

    def urgent_channel(self) -> Channel:
        assert self.session is not None and self.session.urgent is not None
        return self.session.urgent

    def request_recovery(self, redial: session.Redial | None = None) -> None:
        """`migrate-recover`: reconnect a paused post-copy (to a new address with `redial`)."""
        if self.state is not SourceState.POSTCOPY_PAUSED:
            raise MigrationError("no post-copy is paused waiting for recovery")
        self._recover.put(redial)

    def recover_postcopy(self, lost: MigrationError,
                         handlers: dict[RecordType, Callable[[Record], None]]) -> np.ndarray:
        """The link broke after COMMIT: keep every page, wait for `request_recovery`, open new
        connections and return the pages the destination says it still lacks."""
        self.state = SourceState.POSTCOPY_PAUSED
        self.stats.status = "postcopy-paused"
        self.stats.error = (f"post-copy paused: {lost}; every page is kept here, run "
                            "`livemig migrate-recover` to go on")
        self.stats.event("postcopy-paused")
        self._notify_paused()
        while True:
            redial = self._recover.get()
            if redial is not None:
                self.redial = redial
            try:
                missing = self._reconnect(handlers)
                break
            except MigrationError as e:
                self.stats.error = f"post-copy paused: recovery failed: {e}"
                self._notify_paused()
        self.state = SourceState.POSTCOPY
        self.stats.status = "postcopy-active"
        self.stats.error = None
        self.stats.faults.recoveries += 1
        self.stats.event("postcopy-recovered")
        return missing

    def _notify_paused(self) -> None:
        if self.progress is not None:
            self.progress(Progress("postcopy-paused", len(self.stats.rounds),
                                   self.stats.bytes_sent, 0, 0, 0.0, 0.0,
                                   note=self.stats.error or ""))

    def _reconnect(self, handlers: dict[RecordType, Callable[[Record], None]]) -> np.ndarray:
        assert self.session is not None and self.redial is not None
        for c in self.session.channels():
            if c is not self._caller_main:
                c.close()
        deadline = time.monotonic() + HELLO_TIMEOUT
        offer = session.offer(self.opts)
        sess = self.session
        main = session.join(sess, offer, self.redial, Role.RECOVER, Role.RECOVER.value,
                            self.security, deadline)
        back = main if main.duplex else session.join(sess, offer, self.redial, Role.RETURN,
                                                     Role.RETURN.value, self.security, deadline)
        sess.main, sess.back, sess.pages = main, back, []
        self.main = main
        self._join_urgent(deadline)
        self.ret = ReturnPath(back)
        self.ret.handlers.update(handlers)
        self.ret.start()
        rec = self.ret.expect(RecordType.MISSING, deadline)
        return unpack_bitmap(bytes(rec.payload), len(self.ram), "MISSING record")

    def _resolve(self) -> bool | None:
        """Ask the destination, on a new connection, whether COMMIT arrived (None: no answer)."""
        if self.redial is None or self.session is None:
            return None
        try:
            return resolve.ask(self.redial, self.security, self.session.id)
        except MigrationError:
            return None

    def _send_verify(self) -> None:
        key = verify.new_key()
        digests = verify.page_digests(self.ram, key, scan.populated(self.m.memory))
        step = verify.PAGES_PER_RECORD
        for first in range(0, len(digests), step):
            self.check()
            self.send(RecordType.VERIFY, *verify.encode(key, first, digests[first : first + step]))

    def _finish_report(self) -> None:
        s = self.stats
        s.bandwidth = s.bytes_sent / (s.total_ms / 1000) if s.total_ms else 0.0
        first_dest: float | None = None
        if (self.session is not None and hello_mod.FEATURE_REPORT in self.session.features
                and not self.running_lost):
            try:
                assert self.ret is not None
                rec = self.ret.expect(RecordType.REPORT, time.monotonic() + REPORT_WAIT)
                first_dest = records.unpack(rec.payload, "REPORT").get("first_heartbeat")
            except MigrationError:
                first_dest = None
        s.guest_gap_ms = guest_gap_ms(self.m.probe, self._wall0, first_dest)


def migrate(machine: Machine, target: socket.socket | Channel, opts: MigrationOptions,
            progress: Callable[[Progress], None] | None = None,
            cancel: threading.Event | None = None, security: Security | None = None,
            redial: session.Redial | None = None) -> MigrationStats:
    """Migrate `machine` to the destination at the other end of `target`.

    On success the source machine is left paused (it must never run again: stop it). On
    failure before COMMIT the machine is running again, and the MigrationError raised carries
    the stats as `.stats`; CommitUnconfirmed means both sides are paused.
    """
    main = target if isinstance(target, Channel) else SocketChannel(target)
    return Source(machine, main, opts, progress, cancel, security, redial).run()
