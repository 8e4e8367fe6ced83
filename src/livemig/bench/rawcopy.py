"""The raw-copy yardstick: how fast a plain Python sender moves N bytes over loopback TCP.

livemig's migration throughput is compared with this figure (it must reach at least 0.7 of
it), so the sender is the kind an application writes and livemig can write too: ``sendall`` of
a ``memoryview`` over user memory, in large chunks, no kernel tricks (no ``sendfile``, no
``splice``, no zero-copy), because those would flatter the yardstick unless livemig used them
as well. The receiver runs in another process (``python -m livemig.bench.rawcopy --receive``,
so no GIL is shared with the sender) and ``recv_into``s a preallocated, pre-touched buffer.
Both buffers are touched before timing starts, so page faults on first touch are not counted on
either side.

Timing runs from just before the first ``sendall`` to the receiver's one-byte acknowledgement
that it holds every byte: the end-to-end time for N bytes, like a migration's transfer.
"""

from __future__ import annotations

import json
import mmap
import select
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CHUNK = 256 << 10  # bytes per sendall / recv_into call: fastest measured (L2-sized)
ACK = b"\x06"


@dataclass
class RawCopyResult:
    """Samples of one raw-copy measurement; rates in bytes/s."""

    nbytes: int
    chunk: int
    seconds: list[float] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        """bytes/s of each repeat."""
        return [self.nbytes / s for s in self.seconds if s > 0]

    @property
    def bytes_per_s(self) -> float:
        """Median rate over the repeats: the yardstick."""
        return statistics.median(self.rates) if self.rates else 0.0

    @property
    def best_bytes_per_s(self) -> float:
        """Best repeat."""
        return max(self.rates, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "nbytes": self.nbytes,
            "chunk": self.chunk,
            "repeats": len(self.seconds),
            "bytes_per_s": self.bytes_per_s,
            "best_bytes_per_s": self.best_bytes_per_s,
            "seconds": self.seconds,
        }


def _filled_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous shared mapping (like guest RAM), every page touched with non-zero data."""
    buf = mmap.mmap(-1, max(nbytes, 1))
    pattern = bytes(range(1, 256)) * (1 << 12)
    mv = memoryview(buf)
    for off in range(0, nbytes, len(pattern)):
        n = min(len(pattern), nbytes - off)
        mv[off:off + n] = pattern[:n]
    mv.release()
    return buf


def _touched_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous mapping with every page written once, so receiving does not fault."""
    buf = mmap.mmap(-1, max(nbytes, 1))
    for off in range(0, nbytes, mmap.PAGESIZE):
        buf[off] = 1
    return buf


def _receive(nbytes: int, repeats: int, chunk: int, host: str = "127.0.0.1") -> None:
    """Receiver process body: listen on ``host``, print the port, receive ``nbytes``
    ``repeats`` times.

    Each complete copy is acknowledged with one byte.
    """
    buf = _touched_buffer(nbytes)
    mv = memoryview(buf)
    with socket.create_server((host, 0)) as srv:
        print(srv.getsockname()[1], flush=True)
        conn, _ = srv.accept()
        with conn:
            for _ in range(repeats):
                got = 0
                while got < nbytes:
                    n = conn.recv_into(mv[got:got + chunk])
                    if n == 0:
                        raise ConnectionError(f"sender closed after {got} of {nbytes} bytes")
                    got += n
                conn.sendall(ACK)
    mv.release()
    buf.close()


def _start_receiver(nbytes: int, repeats: int, chunk: int, timeout_s: float,
                    host: str = "127.0.0.1", prefix: Sequence[str] = (),
                    ) -> tuple[subprocess.Popen[str], int]:
    """Start the receiver as ``python -m livemig.bench.rawcopy --receive`` (under ``prefix``,
    e.g. ``ip netns exec NS``); return it, port."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "livemig.bench.rawcopy", "--receive",
         str(nbytes), str(repeats), str(chunk), "--host", host],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line.strip().isdigit():
        proc.kill()
        proc.wait()
        raise RuntimeError(f"raw-copy receiver did not start (exit {proc.returncode})")
    return proc, int(line)


def _send_once(sock: socket.socket, mv: memoryview, nbytes: int, chunk: int) -> float:
    """Send ``nbytes`` from ``mv`` in ``chunk``-sized sendall calls; seconds until the ack."""
    t0 = time.perf_counter()
    for off in range(0, nbytes, chunk):
        sock.sendall(mv[off:off + chunk])
    if sock.recv(1) != ACK:
        raise ConnectionError("receiver did not acknowledge the copy")
    return time.perf_counter() - t0


def measure_raw_copy(nbytes: int, repeats: int = 3, chunk: int = DEFAULT_CHUNK,
                     timeout_s: float = 120.0, host: str = "127.0.0.1",
                     receiver_prefix: Sequence[str] = ()) -> RawCopyResult:
    """Time ``repeats`` copies of ``nbytes`` from this process to a receiver process.

    One TCP connection to ``host`` (default 127.0.0.1; set up before timing, like an
    established migration channel), default socket buffers (kernel autotuning),
    ``TCP_NODELAY``. The receiver runs under ``receiver_prefix`` (e.g. in another network
    namespace, where ``host`` is its address).
    """
    if nbytes <= 0:
        raise ValueError("nbytes must be positive")
    chunk = max(1, min(chunk, nbytes))
    result = RawCopyResult(nbytes=nbytes, chunk=chunk)
    buf = _filled_buffer(nbytes)
    mv = memoryview(buf)
    proc: subprocess.Popen[str] | None = None
    try:
        proc, port = _start_receiver(nbytes, repeats, chunk, timeout_s, host, receiver_prefix)
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(repeats):
                result.seconds.append(_send_once(sock, mv, nbytes, chunk))
        proc.wait(timeout_s)
        return result
    finally:
        mv.release()
        buf.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def measure_raw_copy_from(sender_prefix: Sequence[str], nbytes: int, host: str,
                          receiver_prefix: Sequence[str] = (), repeats: int = 1,
                          timeout_s: float = 120.0) -> RawCopyResult:
    """The same copy, with the sender in its own process under ``sender_prefix`` too (e.g.
    ``ip netns exec SRC``, the receiver under ``ip netns exec DST`` at ``host``)."""
    if nbytes <= 0 or nbytes % (1 << 20):
        raise ValueError("nbytes must be a positive whole number of MiB")
    cmd = [*sender_prefix, sys.executable, "-m", "livemig.bench.rawcopy", str(nbytes >> 20),
           "--repeats", str(repeats), "--host", host,
           "--receiver-prefix", shlex.join(receiver_prefix)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"raw copy did not finish in {timeout_s:.0f} s") from e
    if res.returncode:
        lines = res.stderr.strip().splitlines()
        raise RuntimeError(f"raw copy failed: {lines[-1] if lines else res.returncode}")
    d = json.loads(res.stdout)
    return RawCopyResult(nbytes=int(d["nbytes"]), chunk=int(d["chunk"]),
                         seconds=[float(x) for x in d["seconds"]])


def main(argv: list[str] | None = None) -> int:
    """``python -m livemig.bench.rawcopy [SIZE_MIB] [--repeats N] [--chunk-kib K]``."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("size_mib", type=int, nargs="?", default=1024)
    ap.add_argument("--receive", nargs=3, type=int, metavar=("NBYTES", "REPEATS", "CHUNK"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-kib", type=int, default=DEFAULT_CHUNK >> 10)
    ap.add_argument("--host", default="127.0.0.1", help="the receiver's address")
    ap.add_argument("--receiver-prefix", default="",
                    help="command the receiver runs under, e.g. 'ip netns exec NS'")
    a = ap.parse_args(argv)
    if a.receive:
        nbytes, repeats, chunk = a.receive
        _receive(nbytes, repeats, chunk, host=a.host)
        return 0
    res = measure_raw_copy(a.size_mib << 20, a.repeats, a.chunk_kib << 10, host=a.host,
                           receiver_prefix=shlex.split(a.receiver_prefix))
    d = res.to_dict()
    d["MiB_per_s"] = res.bytes_per_s / (1 << 20)
    print(json.dumps(d, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
