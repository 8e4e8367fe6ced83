"""Post-copy's destination side after STATE: guest RAM under userfaultfd, pages pulled and
pushed, until every page the source owed is here.

    prepare    (before READY) pages owed that are present here (sent in a pre-copy round,
               dirtied since) are punched out of the RAM memfd, and RAM is registered with
               userfaultfd in MISSING mode: from now on a missing page is never read as a hole
    arm        (before READY, C path) the C fault loop's thread, parked (faultpath.py)
    start      (at COMMIT, before the guest runs) the C loop goes; or, on Python's path, a
               fault thread, a reader for the urgent connection (answers to requests) and
               one for the main connection (pushes)
    wait       until every owed page is here, or a connection breaks
    reconnect  after a break: MISSING tells the source what is still lacking, faults waiting
               are asked for again, readers start on the new connections
    finish     COMPLETE with the figures; RAM is unregistered

A fault on a page the source never owed (it held nothing there) is filled with zeroes here.
Pages are installed with UFFDIO_COPY, which only fills holes: a pushed copy arriving after the
guest wrote the page it pulled is dropped, never written over the guest's data. No thread of
this process reads guest RAM while it is registered (a Python thread blocked on a fault would
hold the GIL that the fault thread needs).
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from livemig.contract import PAGE_SIZE, GuestMemory
from livemig.extents import runs
from livemig.memfd import punch_pages
from livemig.migration import faultpath, handoff, records
from livemig.migration import pages as pages_mod
from livemig.migration.channels import Channel
from livemig.migration.codecs import CodecSet
from livemig.migration.errors import ConnectionLost, MigrationError, ProtocolError
from livemig.migration.pageserver import (
    MAX_REQUEST,
    encode_request,
    pack_bitmap,
    stateless_codecs,
)
from livemig.migration.postcopy_ahead import PrepareAhead, present_pages, unmap_runs
from livemig.migration.stats import FaultStats
from livemig.migration.uffd import UffdError, Userfaultfd
from livemig.migration.verify import VerifyTable
from livemig.migration.wire import HEADER_SIZE, MAX_PAYLOAD, RecordType

FAULT_POLL = 0.2  # seconds the fault thread waits before looking whether it must stop


@dataclass
class Links:
    """The connections of the post-copy phase: pushes, answers to requests, our answers."""

    main: Channel
    urgent: Channel
    back: Channel


class UffdPlacer:
    """PagePlacer that installs pages under userfaultfd, never over a page already mapped.

    A page absent from the memfd is filled with UFFDIO_COPY / UFFDIO_ZEROPAGE. A page in
    `minor` (in the memfd with stale contents, unmapped here by `prepare`) is written through
    `alias`, a second mapping of the memfd that is not registered, then mapped with
    UFFDIO_CONTINUE; `claimed` makes sure that happens once per page, since after it the
    guest owns the page.
    """

    def __init__(self, uffd: Userfaultfd, base: int, minor: np.ndarray,
                 alias: np.ndarray | None, lock: threading.Lock) -> None:
        self.uffd = uffd
        self.base = base
        self.minor = minor
        self.alias = alias
        self.claimed = np.zeros(len(minor), dtype=bool)
        self._lock = lock

    def zero(self, idx: np.ndarray) -> None:
        self._place(idx, None)

    def store(self, idx: np.ndarray, data: np.ndarray) -> None:
        self._place(idx, data)

    def current(self, idx: np.ndarray) -> np.ndarray:
        raise ProtocolError("a delta or reference codec after COMMIT (post-copy allows only "
                            "zero and raw pages)")

    def _place(self, idx: np.ndarray, data: np.ndarray | None) -> None:
        minor = self.minor[idx]
        if minor.any():
            self._rewrite(idx[minor], None if data is None else data[minor])
            idx = idx[~minor]
            data = None if data is None else data[~minor]
        row = 0
        for first, count in _runs_of(idx):
            self._fill(first, count, None if data is None else data[row : row + count])
            row += count

    def _fill(self, first: int, count: int, data: np.ndarray | None) -> None:
        """Install absent pages first..first+count, skipping any already present."""
        if data is None:
            self._each(first, count, lambda dst, done, n: self.uffd.zero(dst, n))
        else:
            self._each(first, count,
                       lambda dst, done, n: self.uffd.copy(dst, data[done:].ctypes.data, n))

    def _each(self, first: int, count: int, op: Callable[[int, int, int], int]) -> None:
        """Run `op(address, pages done, bytes)` over pages first..first+count until all are
        done; a page found present ends one call, and the next starts after it."""
        done = 0
        while done < count:
            length = (count - done) * PAGE_SIZE
            n = op(self.base + (first + done) * PAGE_SIZE, done, length)
            done += n // PAGE_SIZE + (1 if n < length else 0)

    def _rewrite(self, idx: np.ndarray, data: np.ndarray | None) -> None:
        """New contents for stale pages, written through the alias, then mapped."""
        assert self.alias is not None
        with self._lock:
            fresh = ~self.claimed[idx]
            idx = idx[fresh]
            self.claimed[idx] = True
        if not len(idx):
            return
        self.alias[idx] = 0 if data is None else data[fresh]
        self.map_present(idx)

    def map_present(self, idx: np.ndarray) -> None:
        """UFFDIO_CONTINUE pages whose contents in the memfd are right (EEXIST: mapped)."""
        for first, count in _runs_of(idx):
            self._each(first, count, lambda dst, done, n: self.uffd.cont(dst, n))


class CheckedPlacer:
    """`--verify-memory` in post-copy: each page is checked against the source's digest as it
    arrives, before it is installed (the guest runs on, so RAM cannot be hashed at the end)."""

    def __init__(self, inner: UffdPlacer, table: VerifyTable) -> None:
        self.inner = inner
        self.table = table

    def zero(self, idx: np.ndarray) -> None:
        self._check(idx, None)
        self.inner.zero(idx)

    def store(self, idx: np.ndarray, data: np.ndarray) -> None:
        self._check(idx, data)
        self.inner.store(idx, data)

    def current(self, idx: np.ndarray) -> np.ndarray:
        return self.inner.current(idx)

    def _check(self, idx: np.ndarray, data: np.ndarray | None) -> None:
        problem = self.table.check_rows(idx, data)
        if problem:
            raise MigrationError(problem + "; the page was not installed")


def _runs_of(idx: np.ndarray) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive page numbers in increasing `idx`."""
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(idx)]])
    return [(int(idx[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


class PostcopyReceiver:
    """Everything the destination does between STATE and COMPLETE in a post-copy."""

    def __init__(self, memory: GuestMemory, owed: np.ndarray, verify: VerifyTable | None,
                 t0: float, native: bool = False) -> None:
        self.memory = memory
        self.owed = owed
        self.verify = verify
        self.t0 = t0
        self.npages = len(owed)
        self.received = np.zeros(self.npages, dtype=bool)
        self.remaining = int(np.count_nonzero(owed))
        self.codecs: CodecSet = stateless_codecs()
        self.stats = FaultStats()
        self.bytes_received = 0
        self._waiters: dict[int, list[float]] = {}  # page -> when each fault on it was read
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.failure: MigrationError | None = None
        self._stop = threading.Event()
        self._ram = np.frombuffer(memory.view(), dtype=np.uint8)
        self.base = int(self._ram.ctypes.data)
        self.uffd: Userfaultfd | None = None
        self.placer: UffdPlacer | None = None
        self.links: Links | None = None
        self._threads: list[threading.Thread] = []
        self._handoff = False  # holds a short GIL switch interval (handoff.py)
        self._alias: mmap.mmap | None = None  # second mapping of RAM, for MINOR pages
        self.native = native  # the C fault path (faultpath.py) serves from COMMIT on
        self._loop: faultpath.FaultLoop | None = None
        self._arrays: faultpath.FaultArrays | None = None

    # -- before READY -----------------------------------------------------------------------

    def prepare(self, ahead: PrepareAhead | None = None) -> None:
        """Make every owed page fault here, then register RAM with userfaultfd.

        An owed page present here (sent in a pre-copy round, dirtied since) is unmapped with
        MADV_DONTNEED where the kernel has MINOR faults for shmem: its stale contents stay in
        the memfd, to be overwritten and mapped again; ten times cheaper than punching it out
        (which frees it, and a push then allocates it again). Elsewhere it is punched out.
        `ahead` (hybrid, still valid): what PREPARE found present, and unmapped already.
        """
        fd = self.memory.fd
        if fd is None:
            raise MigrationError("destination RAM has no memfd: post-copy is not possible")
        present = present_pages(fd, self.memory.size) if ahead is None else ahead.present
        stale = present & self.owed
        try:
            self.uffd = Userfaultfd(self.base, self.memory.size, minor=bool(stale.any()))
        except UffdError as e:
            raise MigrationError(f"destination cannot take post-copy: {e}") from e
        alias = None
        if self.uffd.minor:
            self._alias = mmap.mmap(fd, self.memory.size, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
            alias = np.frombuffer(self._alias, np.uint8).reshape(-1, PAGE_SIZE)
            unmap_runs(self.base, stale if ahead is None else ahead.mapped & self.owed)
        else:
            for first, count in runs(stale):
                punch_pages(fd, first, count)
            stale[:] = False
        self.placer = UffdPlacer(self.uffd, self.base, stale, alias, self._lock)

    # -- after COMMIT -----------------------------------------------------------------------

    def arm(self, links: Links) -> None:
        """Before READY: the C fault loop's thread, parked until `start` (C path only)."""
        if self.native and self._loop is None:
            self._make_native_loop(links)

    def start(self, links: Links) -> None:
        """Serve faults, and read pages from `links` (call before the guest runs)."""
        if self.native:
            self.arm(links)
            assert self._loop is not None
            self.links = links
            self._loop.go()
            return
        handoff.acquire()
        self._handoff = True
        self._spawn(self._fault_loop, "postcopy-faults")
        self._attach(links)

    def _make_native_loop(self, links: Links) -> None:
        assert self.uffd is not None and self.placer is not None
        main, urgent = faultpath.plain_socket(links.main), faultpath.plain_socket(links.urgent)
        if main is None or urgent is None:
            raise ProtocolError("page requests on the urgent connection need plain sockets")
        self.links = links
        self.stats.native = True
        alias = self.placer.alias
        self._arrays = faultpath.FaultArrays.new(self.owed, self.placer.minor, self.received)
        self._loop = faultpath.FaultLoop(self.uffd.fd, main, urgent, self.base,
                                         0 if alias is None else int(alias.ctypes.data),
                                         self._arrays, self.remaining)

    def _stop_native(self) -> MigrationError | None:
        """End the C loop; its figures and the faults still waiting become Python's."""
        loop, arrays = self._loop, self._arrays
        if loop is None or arrays is None:
            return None
        loop.stop()
        c = loop.counters
        with self._lock:
            st = self.stats
            st.count += int(c[faultpath.D_FAULTS])
            st.pulled += int(c[faultpath.D_PULLED])
            st.pushed += int(c[faultpath.D_PUSHED])
            st.zero_filled += int(c[faultpath.D_ZERO])
            st.latency_ms.extend(loop.latencies_ms())
            st.blocked_ms += int(c[faultpath.D_BLOCKED_NS]) / 1e6
            if c[faultpath.D_LAST_NS]:
                st.last_page_ms = (int(c[faultpath.D_LAST_NS]) / 1e9 - self.t0) * 1000
            self.bytes_received += int(c[faultpath.D_BYTES])
            self.remaining = loop.remaining
            self._waiters = arrays.waiting()
            if self.placer is not None:  # pages the loop mapped are the guest's now
                self.placer.claimed |= self.received & self.placer.minor
        error = loop.error()
        loop.close()
        self._loop = self._arrays = None
        return error

    def _native_wait(self) -> MigrationError | None:
        """Until the C loop has every page (None) or failed: then Python's path takes over
        (faults keep being served), and the failure is returned."""
        loop = self._loop
        assert loop is not None
        while loop.remaining and loop.result is None:
            os.eventfd_read(loop.done)
        if not loop.remaining:
            return None
        if self._stop.is_set():
            return ConnectionLost("post-copy ended here (closed)")
        error = self._stop_native() or ConnectionLost("post-copy fault loop ended")
        handoff.acquire()
        self._handoff = True
        self._spawn(self._fault_loop, "postcopy-faults")
        self._broken(error)
        return error

    def _spawn(self, target: object, name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _attach(self, links: Links) -> None:
        links.urgent.set_limit(MAX_PAYLOAD)
        links.main.set_limit(MAX_PAYLOAD)
        with self._lock:
            self.links = links
            self.failure = None
        self._spawn(self._reader, "postcopy-urgent", links.urgent, True)
        self._spawn(self._reader, "postcopy-pushes", links.main, False)

    def wait(self) -> MigrationError | None:
        """Block until every owed page is here (None) or a connection broke (its error)."""
        if self._loop is not None:
            return self._native_wait()
        with self._changed:
            self._changed.wait_for(lambda: self.remaining == 0 or self.failure is not None)
            return None if self.remaining == 0 else self.failure

    def missing(self) -> int:
        if self._loop is not None:
            return self._loop.remaining
        with self._lock:
            return self.remaining

    def reconnect(self, links: Links) -> None:
        """New connections after a break: say what is lacking, ask again for what faults
        wait on, read on."""
        with self._lock:
            lacking = self.owed & ~self.received
            waiting = sorted(self._waiters)
        links.back.send(RecordType.MISSING, pack_bitmap(lacking))
        self.stats.recoveries += 1
        self._attach(links)
        for i in range(0, len(waiting), MAX_REQUEST):
            self._request(waiting[i : i + MAX_REQUEST])

    def finish(self) -> None:
        """All pages are here: COMPLETE with the figures, then unregister RAM."""
        assert self.links is not None
        self._stop_native()
        figures = self.stats.to_json()
        self.links.back.send(RecordType.COMPLETE, records.pack(
            {"faults": figures, "latency_ms": [round(x, 4) for x in self.stats.latency_ms],
             "verified": self.verify is not None}))
        self.close()

    def close(self) -> None:
        """Stop the threads and unregister (waiters then find their page or fill a hole)."""
        self._stop.set()
        self._stop_native()
        if self._handoff:
            self._handoff = False
            handoff.release()
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        self.placer = None
        self._ram = np.zeros(0, dtype=np.uint8)  # drop the view of RAM (close may come twice)
        if self._alias is not None:
            try:
                self._alias.close()
            except BufferError:  # a placement still holds a view: unmapped when it ends
                pass
            self._alias = None

    # -- threads ----------------------------------------------------------------------------

    def _broken(self, e: MigrationError) -> None:
        with self._changed:
            if self.failure is None and self.remaining:
                self.failure = e
            self._changed.notify_all()

    def _reader(self, chan: Channel, pulled: bool) -> None:
        try:
            while not self._stop.is_set():
                rec = chan.read()
                if rec.type is not RecordType.PAGES:
                    raise ProtocolError(f"{rec.type.name} record after COMMIT of a post-copy")
                self._place(pages_mod.decode(rec.payload, self.npages, self.codecs), pulled)
                with self._lock:
                    self.bytes_received += len(rec.payload) + HEADER_SIZE
        except MigrationError as e:
            if not self._stop.is_set():
                self._broken(e)
        except (OSError, ValueError) as e:  # the channel was closed under us
            if not self._stop.is_set():
                self._broken(ConnectionLost(f"{chan.label} connection closed: {e}"))

    def _place(self, batch: pages_mod.DecodedBatch, pulled: bool) -> None:
        assert self.placer is not None
        placer = self.placer if self.verify is None else CheckedPlacer(self.placer, self.verify)
        pages_mod.apply(batch, self.codecs, placer)
        now = time.monotonic()
        with self._changed:
            new = batch.idx[~self.received[batch.idx]]
            self.received[new] = True
            self.remaining -= int(np.count_nonzero(self.owed[new]))
            if pulled:
                self.stats.pulled += len(batch.idx)
            else:
                self.stats.pushed += len(batch.idx)
            self._wake_waiters(batch.idx, now)
            if self.remaining == 0:
                self.stats.last_page_ms = (now - self.t0) * 1000
                self._changed.notify_all()

    def _wake_waiters(self, idx: np.ndarray, now: float) -> None:
        if not self._waiters:
            return
        for p in idx.tolist():
            for t in self._waiters.pop(p, ()):
                lat = (now - t) * 1000
                self.stats.latency_ms.append(lat)
                self.stats.blocked_ms += lat

    def _fault_loop(self) -> None:
        uffd = self.uffd
        assert uffd is not None
        while not self._stop.is_set():
            try:
                faults = uffd.wait(FAULT_POLL)
            except (OSError, ValueError):
                return  # unregistered and closed
            now = time.monotonic()
            ask: list[int] = []
            for f in faults:
                p = (f.address - self.base) // PAGE_SIZE
                if 0 <= p < self.npages:
                    self._on_fault(p, now, ask, f.minor)
            if ask:
                self._request(ask)

    def _on_fault(self, page: int, now: float, ask: list[int], minor: bool) -> None:
        assert self.uffd is not None and self.placer is not None
        with self._changed:
            self.stats.count += 1
            if self.received[page]:
                self.uffd.wake(self.base + page * PAGE_SIZE, PAGE_SIZE)
                return
            if not self.owed[page]:  # here already (MINOR), or the source held nothing there
                if minor:
                    self.placer.map_present(np.array([page]))
                else:
                    self.placer.zero(np.array([page]))
                    self.stats.zero_filled += 1
                self.received[page] = True
                return
            if page not in self._waiters:
                ask.append(page)
            self._waiters.setdefault(page, []).append(now)

    def _request(self, pages: list[int]) -> None:
        links = self.links
        if links is None:
            return
        try:
            links.back.send(RecordType.PAGE_REQUEST, encode_request(pages))
        except MigrationError as e:  # asked again after the reconnection
            self._broken(e)
