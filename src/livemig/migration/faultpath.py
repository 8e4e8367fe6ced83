"""Post-copy's fault path in C (`livemig._faultpath`, built from src/livemig/native/).

In Python a fault is answered by three threads in turn, each waiting for the GIL behind
threads busy pushing or placing pages: about a millisecond a fault on two cores. The C loops
run with the GIL released from start to end:

- `RequestServer` (source): reads PAGE_REQUEST records on the urgent connection and answers
  each there with raw pages from frozen RAM;
- `FaultLoop` (destination): reads userfaultfd, asks for owed pages on the urgent connection,
  installs what comes on it and on the main connection (pushes), fills holes nobody owes.

Both sides use it when both have it (hello feature `urgent-requests`), the connections are
plain sockets (TLS is Python's) and no `--verify-memory` digest must be checked before a
page goes in. The first failure of either loop hands everything back to the Python path
(`postcopy_dest.py`, `pageserver.py`), which also does recovery.
"""

from __future__ import annotations

import importlib
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from livemig.migration.channels import Channel
from livemig.migration.channels.sockets import SocketChannel
from livemig.migration.errors import ConnectionLost, MigrationError, ProtocolError
from livemig.migration.hello import FEATURE_URGENT_REQUESTS


def _load() -> ModuleType | None:
    try:
        return importlib.import_module("livemig._faultpath")
    except ImportError:  # not built (a source tree run without `pip install`): Python's path
        return None


_native = _load()

LATENCY_SAMPLES = 1 << 16  # fault latencies kept (the rest still count in the totals)

# counter slots, as in faultpath.c
S_REQUESTS, S_PULLED, S_BYTES, S_AHEAD, S_QUEUE_MAX, S_CURSOR, S_QUEUED = range(7)
(D_FAULTS, D_PULLED, D_PUSHED, D_ZERO, D_NLAT, D_BLOCKED_NS, D_LAST_NS, D_BYTES,
 D_REMAINING, D_REQUESTS, D_FAILED_FD) = range(11)
_WHERE = {1: "main", 2: "urgent", 3: "userfaultfd"}


def available() -> bool:
    """Whether the C fault path was built here."""
    return _native is not None


def plain_socket(chan: Channel | None) -> socket.socket | None:
    """The socket under `chan` when C may read and write it directly (not TLS)."""
    if isinstance(chan, SocketChannel) and type(chan.sock) is socket.socket:
        return chan.sock
    return None


def usable(features: Sequence[str], checked: bool, main: Channel | None,
           urgent: Channel | None) -> bool:
    """Whether a post-copy may serve its faults here (both sides decide the same way): built
    here, negotiated (the peer built it too), no digest to check before a page goes in
    (`checked`: --verify-memory), and plain sockets under both connections."""
    return (available() and FEATURE_URGENT_REQUESTS in features and not checked
            and plain_socket(main) is not None and plain_socket(urgent) is not None)


def _error(code: int, where: str) -> MigrationError:
    if code == 1:
        return ConnectionLost(f"{where} connection closed by peer")
    if code == 2:
        return ProtocolError(f"malformed record on the {where} connection during post-copy")
    return ConnectionLost(f"{where}: {os.strerror(-code)}")


class _Loop:
    """A C loop on a thread of its own, stopped through an eventfd."""

    def __init__(self) -> None:
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None
        self.result: int | None = None

    def _start(self, name: str, call: object, *args: object) -> None:
        def run() -> None:
            self.result = call(*args)  # type: ignore[operator]
            self._ended()

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def _ended(self) -> None:
        """Called on the loop's thread once the C loop returned."""

    def stop(self) -> int | None:
        """End the loop and wait for it; its result (0: stopped by us)."""
        if self._thread is not None:
            os.eventfd_write(self._stop, 1)
            self._thread.join()
            self._thread = None
        if self._stop >= 0:
            os.close(self._stop)
            self._stop = -1
        return self.result


class RequestServer(_Loop):
    """Source: answers page requests on `sock` from `ram_addr` (frozen). `owed` and `sent` are
    the page server's arrays; the loop marks what it sends in `sent`."""

    def __init__(self, sock: socket.socket, ram_addr: int, owed: np.ndarray,
                 sent: np.ndarray) -> None:
        super().__init__()
        self.counters = np.zeros(8, dtype=np.int64)
        assert _native is not None
        self._start("postcopy-requests", _native.serve_requests, sock.fileno(), self._stop,
                    ram_addr, len(owed), owed, sent, self.counters)

    def error(self) -> MigrationError | None:
        """Why the loop ended by itself (None: it runs, or was stopped)."""
        return None if not self.result else _error(self.result, "urgent")


@dataclass
class FaultArrays:
    """What the destination's loop and Python's path share (bool/int arrays, one per page)."""

    owed: np.ndarray
    minor: np.ndarray
    received: np.ndarray
    t_first: np.ndarray
    t_sum: np.ndarray
    nfault: np.ndarray

    @classmethod
    def new(cls, owed: np.ndarray, minor: np.ndarray, received: np.ndarray) -> FaultArrays:
        n = len(owed)
        return cls(owed, minor, received, np.zeros(n, np.int64), np.zeros(n, np.int64),
                   np.zeros(n, np.int32))

    def waiting(self) -> dict[int, list[float]]:
        """Pages faults still wait on: page -> when each fault came (time.monotonic)."""
        pages = np.flatnonzero((self.nfault > 0) & ~self.received)
        return {int(p): [float(self.t_first[p]) / 1e9] * int(self.nfault[p]) for p in pages}


class FaultLoop(_Loop):
    """Destination: from `go` (COMMIT) on, serves faults and installs pages until stopped or
    a connection fails. Made before READY, so that no thread needs starting at COMMIT.
    `done` (an eventfd) is written when the last owed page is in, and when the loop ends."""

    def __init__(self, uffd: int, main: socket.socket, urgent: socket.socket, base: int,
                 alias: int, arrays: FaultArrays, remaining: int) -> None:
        super().__init__()
        self._go = os.eventfd(0, os.EFD_CLOEXEC)
        self.done = os.eventfd(0, os.EFD_CLOEXEC)
        self.counters = np.zeros(16, dtype=np.int64)
        self.counters[D_REMAINING] = remaining
        self.latency = np.zeros(LATENCY_SAMPLES, dtype=np.float64)
        a = arrays
        assert _native is not None
        self._start("postcopy-faults", _native.fault_loop, uffd, main.fileno(), urgent.fileno(),
                    self._stop, self._go, self.done, base, alias, len(a.owed), a.owed, a.minor,
                    a.received, a.t_first, a.t_sum, a.nfault, self.latency, self.counters)

    def go(self) -> None:
        """COMMIT came: the connections and faults are the loop's from now on."""
        os.eventfd_write(self._go, 1)

    def _ended(self) -> None:
        if self.result:
            os.eventfd_write(self.done, 1)

    @property
    def remaining(self) -> int:
        return int(self.counters[D_REMAINING])

    def error(self) -> MigrationError | None:
        if not self.result:
            return None
        return _error(self.result, _WHERE.get(int(self.counters[D_FAILED_FD]), "post-copy"))

    def latencies_ms(self) -> list[float]:
        return self.latency[: min(int(self.counters[D_NLAT]), LATENCY_SAMPLES)].tolist()

    def stop(self) -> int | None:
        result = super().stop()
        if self.done >= 0:
            os.eventfd_write(self.done, 1)  # a waiter on `done` sees the loop has ended
        return result

    def close(self) -> None:
        self.stop()
        for fd in (self.done, self._go):
            if fd >= 0:
                os.close(fd)
        self.done = self._go = -1
