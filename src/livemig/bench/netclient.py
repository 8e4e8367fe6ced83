"""A UDP client of netserve's key-value protocol (docs/guest-abi.md), at a fixed request rate.

Even requests PUT a fresh value into key (i/2 mod keys); odd ones GET the key PUT about two
seconds earlier, so that reads span a migration without depending on how frames that raced
each other across it were ordered. Every reply is checked: the sequence number it echoes, the
value (a PUT's value echoed, a GET's equal to what was last written there), and the server's
count of served requests, which only grows while the guest lives (a guest rebooted or rolled
back would count from less). At the end every key written is read back and compared.

Measured: requests lost (never answered), late (answered after `late_ms`), the largest gap
between consecutive replies, duplicates. Runs as ``python -m livemig.bench.netclient`` inside
the client namespace and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import time
from dataclasses import asdict, dataclass, field

MAGIC = 0x564B4D4C
PUT, GET, REPLY = 1, 2, 0x80
REQUEST = struct.Struct("<IBBHIIQQ")  # magic, op, flags, -, key, -, seq, value
ANSWER = struct.Struct("<IBBHIIQQQ")  # magic, op|0x80, status, -, key, -, seq, value, served
GRACE_S = 5.0  # how long replies are awaited after the last request


class KvError(RuntimeError):
    """The server did not answer, or answered something that is not a reply."""


@dataclass
class Reply:
    op: int
    status: int
    key: int
    seq: int
    value: int
    served: int


def parse(data: bytes) -> Reply | None:
    if len(data) < ANSWER.size:
        return None
    magic, op, status, _, key, _, seq, value, served = ANSWER.unpack_from(data)
    if magic != MAGIC or not op & REPLY:
        return None
    return Reply(op & ~REPLY, status, key, seq, value, served)


def value_for(seq: int) -> int:
    """A value nobody else writes: depends on the request and is never zero."""
    return ((seq * 0x9E3779B97F4A7C15) ^ 0x5DEECE66D) & 0xFFFF_FFFF_FFFF_FFFF | 1


@dataclass
class LoadResult:
    """What the client saw; `ok` when nothing was lost, wrong or read back differently."""

    sent: int = 0
    replied: int = 0
    lost: int = 0
    late: int = 0
    duplicates: int = 0
    wrong_values: int = 0
    served_regressions: int = 0
    largest_gap_ms: float = 0.0
    largest_gap_at_s: float = 0.0  # when that gap ended, seconds after the first request
    max_latency_ms: float = 0.0
    max_latency_at_s: float = 0.0  # when the slowest request was sent
    readback_checked: int = 0
    readback_wrong: int = 0
    first_wrong: str = ""
    lost_seqs: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.wrong_values or self.served_regressions
                    or self.readback_wrong)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["lost_seqs"] = self.lost_seqs[:20]
        d["ok"] = self.ok
        return d


class LoadClient:
    """One run of requests at `rate` per second for `duration` seconds."""

    def __init__(self, host: str, port: int, rate: float, keys: int, late_ms: float) -> None:
        self.addr = (host, port)
        self.rate = rate
        self.keys = keys
        self.late_s = late_ms / 1000
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.sock.setblocking(False)
        self.res = LoadResult()
        self.sent_at: dict[int, float] = {}
        self.expect: dict[int, tuple[int, int, set[int]]] = {}  # seq -> op, key, values allowed
        self.written: dict[int, int] = {}  # key -> last value whose PUT was answered
        # key -> values PUT without an answer yet (or ever): a lost reply may hide a done PUT
        self.unacked: dict[int, set[int]] = {}
        self.last_reply = 0.0
        self.t0 = 0.0
        self.last_served = 0
        self._answered: set[int] = set()

    def _request(self, seq: int) -> bytes:
        lag = 2 * int(self.rate) // 2 * 2  # GET what was PUT ~2 s ago, or the latest PUT early on
        if seq % 2 == 0:
            key, op, value = (seq // 2) % self.keys, PUT, value_for(seq)
            self.unacked.setdefault(key, set()).add(value)
        else:
            src = seq - 1 - lag if seq - 1 >= lag else seq - 1  # an even seq: a PUT
            key, op, value = (src // 2) % self.keys, GET, 0
        # What a GET may read: the last answered PUT, or one still unanswered when it was sent.
        self.expect[seq] = (op, key, {self.written.get(key, 0), *self.unacked.get(key, ())})
        return REQUEST.pack(MAGIC, op, 0, 0, key, 0, seq, value)

    def run(self, duration: float) -> LoadResult:
        """Warm up (the client's ARP entry, a first answer), then send for `duration` s."""
        self.sock.setblocking(True)
        if self._ask(GET, 0, 1 << 41, 1.0, 10) is None:
            raise KvError(f"no reply from {self.addr[0]}:{self.addr[1]} before the run")
        self.sock.setblocking(False)
        n = int(duration * self.rate)
        t0 = self.t0 = time.monotonic()
        for seq in range(n):
            due = t0 + seq / self.rate
            self._drain(due)
            self.sent_at[seq] = time.monotonic()
            try:
                self.sock.sendto(self._request(seq), self.addr)
            except OSError:
                pass  # counted as lost: no reply will come
            self.res.sent += 1
        self._drain_all(time.monotonic() + GRACE_S)
        self.res.lost_seqs = sorted(set(self.sent_at) - self._answered)
        self.res.lost = len(self.res.lost_seqs)
        return self.res

    def _drain_all(self, until: float) -> None:
        """Wait for the replies still missing, until `until` at most."""
        while len(self._answered) < len(self.sent_at) and time.monotonic() < until:
            self._drain(min(until, time.monotonic() + 0.1))

    def _drain(self, until: float) -> None:
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return
            while True:
                try:
                    data = self.sock.recv(2048)
                except BlockingIOError:
                    break
                self._on_reply(data, time.monotonic())

    def _on_reply(self, data: bytes, now: float) -> None:
        r = parse(data)
        if r is None or r.seq not in self.sent_at:
            return
        if r.seq in self._answered:
            self.res.duplicates += 1
            return
        self._answered.add(r.seq)
        self.res.replied += 1
        latency = now - self.sent_at[r.seq]
        if latency * 1000 > self.res.max_latency_ms:
            self.res.max_latency_ms = latency * 1000
            self.res.max_latency_at_s = round(self.sent_at[r.seq] - self.t0, 3)
        if latency > self.late_s:
            self.res.late += 1
        if self.last_reply and (now - self.last_reply) * 1000 > self.res.largest_gap_ms:
            self.res.largest_gap_ms = (now - self.last_reply) * 1000
            self.res.largest_gap_at_s = round(now - self.t0, 3)
        self.last_reply = now
        if r.served < self.last_served:
            self.res.served_regressions += 1
        self.last_served = max(self.last_served, r.served)
        op, key, want = self.expect.pop(r.seq)
        got_ok = r.status == 0 and r.op == op and r.key == key
        if op == PUT:
            got_ok = got_ok and r.value == value_for(r.seq)
            self.written[key] = r.value
            self.unacked.get(key, set()).discard(r.value)
        else:
            got_ok = got_ok and r.value in want
        if not got_ok:
            self.res.wrong_values += 1
            self.res.first_wrong = self.res.first_wrong or (
                f"seq {r.seq} op {op} key {key}: got {r.value:#x} status {r.status}, "
                f"want one of {sorted(hex(w) for w in want)}")

    def read_back(self, timeout: float = 0.5, tries: int = 5) -> None:
        """GET every key written and compare with the last value PUT there."""
        self.sock.setblocking(True)
        seq, silent = 1 << 40, 0
        for key, want in sorted(self.written.items()):
            got = self._ask(GET, key, seq, timeout, tries)
            seq += 1
            self.res.readback_checked += 1
            silent = silent + 1 if got is None else 0
            if silent >= 3:  # the server is gone: count the rest as wrong without asking
                self.res.readback_wrong += len(self.written) - self.res.readback_checked + 1
                self.res.first_wrong = self.res.first_wrong or "server stopped answering"
                return
            if got is None or (got.value != want and got.value not in self.unacked.get(key, ())):
                self.res.readback_wrong += 1
                self.res.first_wrong = self.res.first_wrong or (
                    f"read back key {key}: got {None if got is None else hex(got.value)}, "
                    f"want {want:#x}")

    def _ask(self, op: int, key: int, seq: int, timeout: float, tries: int) -> Reply | None:
        self.sock.settimeout(timeout)
        for _ in range(tries):
            self.sock.sendto(REQUEST.pack(MAGIC, op, 0, 0, key, 0, seq, 0), self.addr)
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                try:
                    r = parse(self.sock.recv(2048))
                except TimeoutError:
                    break
                if r is not None and r.seq == seq:
                    return r
        return None


def request(host: str, port: int, op: int, key: int, value: int = 0,
            timeout: float = 1.0, tries: int = 5) -> Reply:
    """One request, retried; KvError when no reply comes."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        seq = int.from_bytes(socket.inet_aton(host), "big") ^ int(time.monotonic_ns())
        for _ in range(tries):
            s.sendto(REQUEST.pack(MAGIC, op, 0, 0, key, 0, seq, value), (host, port))
            try:
                while True:
                    r = parse(s.recv(2048))
                    if r is not None and r.seq == seq:
                        return r
            except TimeoutError:
                continue
    raise KvError(f"no reply from {host}:{port} after {tries} tries")


def main(argv: list[str] | None = None) -> int:
    """``python -m livemig.bench.netclient HOST [--rate 500] [--duration 10]``: JSON out."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("host")
    ap.add_argument("--port", type=int, default=7777)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--keys", type=int, default=4096)
    ap.add_argument("--late-ms", type=float, default=200.0)
    ap.add_argument("--put", action="append", default=[], metavar="KEY=VALUE",
                    help="instead of a load run: PUT these (then --get ones), print replies")
    ap.add_argument("--get", action="append", type=int, default=[], metavar="KEY")
    a = ap.parse_args(argv)
    if a.put or a.get:
        puts = [tuple(int(x, 0) for x in p.split("=", 1)) for p in a.put]
        replies = [request(a.host, a.port, PUT, k, v) for k, v in puts]
        replies += [request(a.host, a.port, GET, k) for k in a.get]
        print(json.dumps([asdict(r) for r in replies]))
        return 0
    c = LoadClient(a.host, a.port, a.rate, a.keys, a.late_ms)
    c.run(a.duration)
    c.read_back()
    print(json.dumps(c.res.to_dict()))
    return 0 if c.res.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
