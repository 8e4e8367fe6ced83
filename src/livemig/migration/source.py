"""The source side of a migration, as an explicit state machine.

    CONNECTED --HELLO/WELCOME--> NEGOTIATED --CONFIG/CONFIG_OK--> CONFIGURED
    CONFIGURED --(precopy: live rounds)--> ITERATING --pause--> SWITCHOVER
    CONFIGURED --(stop-copy: pause)------------------------> SWITCHOVER
    SWITCHOVER --last pages, VERIFY, STATE; READY--> READY
    READY --COMMIT--> COMMITTED --RUNNING--> COMPLETED
    any state before COMMITTED --failure--> FAILED (source resumed if it was paused)
    any state before COMMITTED --cancel--> CANCELLED (ABORT sent, source resumed)
    COMMITTED --no RUNNING--> COMMIT_UNCONFIRMED (source stays paused, error raised)

After COMMIT the source never resumes by itself: the destination may be running.
"""

from __future__ import annotations

import enum
import socket
import threading
import time
from collections.abc import Callable

import numpy as np

from livemig.contract import PAGE_SIZE, Machine
from livemig.extents import runs
from livemig.migration import hello as hello_mod
from livemig.migration import records, scan, verify
from livemig.migration.errors import (
    Cancelled,
    CommitUnconfirmed,
    ConnectionLost,
    MigrationError,
    ProtocolError,
)
from livemig.migration.gap import guest_gap_ms
from livemig.migration.options import MigrationOptions, Mode
from livemig.migration.pages import MAX_BATCH, SUPPORTED, BatchEncoder, Encoding
from livemig.migration.precopy import Convergence
from livemig.migration.returnpath import ReturnPath
from livemig.migration.stats import MigrationStats, Progress, RoundStats
from livemig.migration.transport import RateLimiter, tune
from livemig.migration.wire import RecordType, frame, send_buffers, send_record

SCAN_CHUNK = 32768  # pages scanned for zeroes at a time in the first round (128 MiB)
PROGRESS_EVERY = 0.05  # seconds between progress callbacks


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


class Source:
    """Runs one outgoing migration of `machine` over a connected socket."""

    def __init__(
        self,
        machine: Machine,
        sock: socket.socket,
        opts: MigrationOptions,
        progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.m = machine
        self.sock = sock
        self.opts = opts
        self.progress = progress
        self.cancel = cancel or threading.Event()
        self.state = SourceState.CONNECTED
        self.stats = MigrationStats(mode=opts.mode.value)
        self.ret = ReturnPath(sock)
        self.limiter = RateLimiter(opts.max_bandwidth)
        view = np.frombuffer(machine.memory.view(), dtype=np.uint8)
        self.ram = view.reshape(-1, PAGE_SIZE)
        self.encoder = BatchEncoder(self.ram)
        self.features: list[str] = []
        self.paused = False
        self._live_bytes = 0
        self._live_time = 0.0
        self._last_progress = 0.0
        self._t0 = 0.0
        self._wall0 = 0.0
        self._paused_at = 0.0
        self._step_t = 0.0
        self.m_throttle = 0.0
        self.stop_reason = ""

    # -- driver ---------------------------------------------------------------------------

    def run(self) -> MigrationStats:
        """Migrate; returns the stats or raises MigrationError with `.stats` attached."""
        self._t0, self._wall0 = time.monotonic(), time.time()
        try:
            tune(self.sock)
            self._negotiate()
            self._configure()
            self.stats.setup_ms = self._ms()
            self.stats.status = "active"
            if self.opts.mode is Mode.PRECOPY:
                self._precopy()
            else:
                self._stop_copy()
            self._switchover()
        except MigrationError as e:
            self._fail(e)
            e.stats = self.stats  # type: ignore[attr-defined]
            raise
        except Exception as e:  # a bug or a machine error: still never leave the guest paused
            err = MigrationError(f"migration failed: {type(e).__name__}: {e}")
            self._fail(err)
            err.stats = self.stats  # type: ignore[attr-defined]
            raise err from e
        return self.stats

    def _step(self, name: str) -> None:
        """Close the current switch-over step (timed since the previous one)."""
        now = time.monotonic()
        self.stats.switchover_ms[name] = (now - self._step_t) * 1000
        self._step_t = now

    def _ms(self) -> float:
        return (time.monotonic() - self._t0) * 1000

    def _fail(self, e: MigrationError) -> None:
        """Leave the source as it must be after `e`, and record why."""
        self.stats.total_ms = self._ms()
        self.stats.error = str(e)
        if self.state in (SourceState.COMMITTED, SourceState.COMPLETED):
            self.state = SourceState.COMMIT_UNCONFIRMED
            self.stats.status = "commit-unconfirmed"
            return
        cancelled = isinstance(e, Cancelled)
        self.state = SourceState.CANCELLED if cancelled else SourceState.FAILED
        self.stats.status = self.state.value
        reason = str(e).encode()[:4096]
        try:
            if not isinstance(e, ConnectionLost):
                send_record(self.sock, RecordType.ABORT, reason)
        except MigrationError:
            pass
        self._restore_source()

    def _restore_source(self) -> None:
        try:
            self.m.memory.stop_dirty_log()
        except Exception:
            pass
        self.m.set_throttle(0.0)
        if self.paused:
            self.m.resume()
            self.paused = False

    # -- setup ----------------------------------------------------------------------------

    def _negotiate(self) -> None:
        offer = hello_mod.Hello(encodings=list(SUPPORTED))
        if not self.opts.verify_memory:
            offer.features.remove(hello_mod.FEATURE_VERIFY)
        send_record(self.sock, RecordType.HELLO, offer.encode())
        self.ret.start()
        rec = self.ret.expect(RecordType.WELCOME, timeout=30)
        welcome = hello_mod.Hello.decode(rec.payload)
        hello_mod.check_welcome(welcome, offer)
        if Encoding.RAW.wire_name not in welcome.encodings:
            raise ProtocolError("destination accepts no raw pages; nothing can be sent")
        if Encoding.ZERO.wire_name not in welcome.encodings:
            raise ProtocolError("destination does not accept zero pages (required by this version)")
        if self.opts.verify_memory and hello_mod.FEATURE_VERIFY not in welcome.features:
            raise ProtocolError("destination does not support --verify-memory")
        self.features = welcome.features
        self.state = SourceState.NEGOTIATED

    def _configure(self) -> None:
        # "populated": where RAM holds data, a hint for the destination's prefaulting.
        cfg = {"machine": self.m.config.to_dict(), "page_size": PAGE_SIZE,
               "mode": self.opts.mode.value,
               "populated": [list(r) for r in runs(scan.populated(self.m.memory))]}
        send_record(self.sock, RecordType.CONFIG, records.pack(cfg))
        self.ret.expect(RecordType.CONFIG_OK, timeout=60)
        self.state = SourceState.CONFIGURED

    # -- sending pages --------------------------------------------------------------------

    def _check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("migration cancelled; the source machine keeps running")
        self.ret.check()

    def _send_pages(self, idx: np.ndarray, rs: RoundStats, remaining: int = 0) -> None:
        for i in range(0, len(idx), MAX_BATCH):
            self._check()
            b = self.encoder.encode(idx[i : i + MAX_BATCH], frozen=self.paused)
            n = self._send(RecordType.PAGES, b.meta, b.data)
            rs.bytes_sent += n
            rs.add("zero", b.zero)
            rs.add("raw", b.raw)
            self.limiter.spent(n)
            self._report(rs, i + b.pages, len(idx), remaining)

    def _send(self, rtype: RecordType, *parts: bytes | memoryview) -> int:
        try:
            n = send_buffers(self.sock, frame(rtype, *parts))
        except ConnectionLost:
            self.ret.settle()
            self.ret.check()  # prefer the destination's own reason, if it gave one
            raise
        self.stats.bytes_sent += n
        return n

    def _report(self, rs: RoundStats, done: int, total: int, remaining: int) -> None:
        now = time.monotonic()
        if self.progress is None or (now - self._last_progress < PROGRESS_EVERY and done < total):
            return
        self._last_progress = now
        bw = self._live_bytes / self._live_time if self._live_time else 0.0
        phase = "switchover" if self.paused else "round"
        self.progress(Progress(phase, rs.number, self.stats.bytes_sent, done, total,
                               remaining, bw, self.m_throttle))

    def _round(self, number: int, idx: np.ndarray | None) -> RoundStats:
        """Send one round: `idx` pages, or every non-zero page when None."""
        rs = RoundStats(number, throttle=self.m_throttle)
        self.stats.rounds.append(rs)
        t = time.monotonic()
        if idx is None:
            for nz in scan.iter_nonzero(self.ram, scan.populated(self.m.memory), SCAN_CHUNK):
                self._send_pages(nz, rs)
        else:
            self._send_pages(idx, rs)
        self._send(RecordType.ROUND_END, records.pack({"round": number,
                                                       "pages": sum(rs.pages.values())}))
        rs.duration_ms = (time.monotonic() - t) * 1000
        return rs

    # -- strategies -----------------------------------------------------------------------

    def _precopy(self) -> None:
        self.state = SourceState.ITERATING
        conv = Convergence(self.opts)
        self.m.memory.start_dirty_log()
        idx: np.ndarray | None = None
        number = 1
        while True:
            t = time.monotonic()
            rs = self._round(number, idx)
            self._live_time += time.monotonic() - t
            self._live_bytes += rs.bytes_sent
            dirty_mask = self.m.memory.fetch_dirty()
            dirty = np.flatnonzero(dirty_mask)
            rs.dirty_pages = len(dirty)
            elapsed = max(rs.duration_ms / 1000, 1e-6)
            self.stats.dirty_rate = len(dirty) / elapsed
            bw = self._live_bytes / self._live_time if self._live_time else 0.0
            d = conv.after_round(number, sum(rs.pages.values()), len(dirty), bw)
            if d.throttle != self.m_throttle:
                self.m.set_throttle(d.throttle)
                self.m_throttle = d.throttle
                self.stats.throttle = max(self.stats.throttle, d.throttle)
            if d.stop:
                self.stop_reason = d.reason
                break
            idx = dirty
            number += 1
        self._pause()
        # Pages dirtied during the last live round and since: a mask OR, not a sorted union.
        final = np.flatnonzero(dirty_mask | self.m.memory.fetch_dirty())
        self.m.memory.stop_dirty_log()
        self._step("dirty-bitmap")
        self._round(number + 1, final)
        self._step("last-round")

    def _stop_copy(self) -> None:
        self._pause()
        self._round(1, None)
        self._step("last-round")

    def _pause(self) -> None:
        self._step_t = time.monotonic()
        self.m.pause()
        self.paused = True
        self._paused_at = time.monotonic()
        self._step("pause")
        self.state = SourceState.SWITCHOVER

    # -- switch-over ----------------------------------------------------------------------

    def _switchover(self) -> None:
        if self.opts.verify_memory:
            self._send_verify()
            self._step("verify")
        self._check()
        st = self.m.save_state()
        payload = {"state": st.encode(), "probe": self.m.probe.state()}
        self._step("save-state")
        self._send(RecordType.STATE, records.pack(payload))
        self.ret.expect(RecordType.READY, timeout=self.opts.commit_timeout_s)
        self._step("until-ready")
        self.state = SourceState.READY
        if self.cancel.is_set():
            raise Cancelled("migration cancelled before COMMIT; the source machine resumes")
        self.state = SourceState.COMMITTED  # from here on the source never resumes
        self._send(RecordType.COMMIT)
        try:
            self.ret.expect(RecordType.RUNNING, timeout=self.opts.commit_timeout_s)
        except MigrationError as e:
            raise CommitUnconfirmed(
                f"COMMIT sent but the destination never confirmed RUNNING ({e}); both sides "
                "stay paused: check the destination before resuming anything"
            ) from e
        self._step("until-running")
        self.stats.downtime_ms = (time.monotonic() - self._paused_at) * 1000
        self.stats.total_ms = self._ms()
        self.state = SourceState.COMPLETED
        self.stats.status = "completed"
        if self.opts.verify_memory:
            self.stats.verified_memory = True
        self._finish_report()

    def _send_verify(self) -> None:
        key = verify.new_key()
        digests = verify.page_digests(self.ram, key, scan.populated(self.m.memory))
        step = verify.PAGES_PER_RECORD
        for first in range(0, len(digests), step):
            self._check()
            self._send(RecordType.VERIFY, *verify.encode(key, first, digests[first : first + step]))

    def _finish_report(self) -> None:
        s = self.stats
        s.bandwidth = s.bytes_sent / (s.total_ms / 1000) if s.total_ms else 0.0
        first_dest: float | None = None
        if hello_mod.FEATURE_REPORT in self.features:
            try:
                rep = records.unpack(self.ret.expect(RecordType.REPORT, timeout=5).payload,
                                     "REPORT")
                first_dest = rep.get("first_heartbeat")
            except MigrationError:
                first_dest = None
        s.guest_gap_ms = guest_gap_ms(self.m.probe, self._wall0, first_dest)


def migrate(
    machine: Machine,
    sock: socket.socket,
    opts: MigrationOptions,
    progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
) -> MigrationStats:
    """Migrate `machine` to the destination at the other end of `sock`.

    On success the source machine is left paused (it must never run again: stop it). On
    failure before COMMIT the machine is running again, and the MigrationError raised carries
    the stats as `.stats`; CommitUnconfirmed means both sides are paused.
    """
    return Source(machine, sock, opts, progress, cancel).run()
