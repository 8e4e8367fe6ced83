"""`livemig bench cpu-state --transport udp`: the thesis' interval and livemig's, over UDP.

The thesis (seed 000) timed, per trial, from the start of its send command to the return of
`sendto`: capture of the registers, printing their values on the console, and one UDP datagram
of a fixed 200 bytes (`unsigned data_buffer[50]`, 32-bit words, whatever the register count),
with no acknowledgement. Its console was a serial line: at 115200 baud (10 bits a character)
a 34-character line takes 2.95 ms, which matches its slope of ~5.9 ms per register per 2 vCPUs.

Each trial here, with the guest paused once:

- thesis interval: capture N registers of every vCPU, print them (one line per register, to a
  console sink written at `baud`, 0 = as fast as the sink takes it), pack them into the fixed
  200-byte buffer (32-bit truncated, as the thesis did) and `sendto`;
- livemig interval: the same capture, then one datagram with the full 64-bit values, adopted
  by the destination into its vCPUs, which replies with an acknowledgement carrying a digest of
  what it holds; timed until that acknowledgement is received and checked.

Datagrams are authenticated: each ends in a 16-byte keyed BLAKE3 tag under a key the source
hands the peer over the control connection; anything else is dropped. Layout: kind (1 byte:
T thesis, R registers, A ack, E end), sequence (u32), then for R the register count (u8) and
the u64 values vCPU after vCPU; for T the 200-byte buffer; for A the adopt time (f64, ms) and the
16-byte digest of the registers read back; then the tag.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import blake3

THESIS_DATAGRAM = 200
TAG = 16
ACK_TIMEOUT = 2.0
_HEAD = struct.Struct("<cI")


class UdpError(Exception):
    """A datagram was lost, late or did not authenticate; the message says which."""


def tag(key: bytes, data: bytes) -> bytes:
    return blake3.blake3(data, key=key).digest(TAG)


def seal(key: bytes, data: bytes) -> bytes:
    return data + tag(key, data)


def opened(key: bytes, datagram: bytes) -> bytes | None:
    """The datagram without its tag, or None when the tag is wrong."""
    if len(datagram) < _HEAD.size + TAG:
        return None
    body = datagram[:-TAG]
    return body if tag(key, body) == datagram[-TAG:] else None


def thesis_buffer(per_vcpu: list[dict[str, int]], names: list[str]) -> bytes:
    """The thesis' fixed 200-byte buffer: 32-bit words, truncated, zero-padded."""
    words = [v & 0xFFFF_FFFF for regs in per_vcpu for v in (regs[n] for n in names)]
    raw = struct.pack(f"<{len(words)}I", *words)[:THESIS_DATAGRAM]
    return raw + bytes(THESIS_DATAGRAM - len(raw))


def short_digest(data: bytes) -> bytes:
    return blake3.blake3(data).digest(16)


class SerialConsole:
    """Lines written to `sink`, taking as long as a serial line at `baud` would (0: no wait)."""

    def __init__(self, sink: TextIO, baud: int) -> None:
        self.sink = sink
        self.baud = baud

    def print_registers(self, per_vcpu: list[dict[str, int]], names: list[str]) -> None:
        text = "".join(f"vcpu{i} {n} = 0x{regs[n]:016x}\n"
                       for i, regs in enumerate(per_vcpu) for n in names)
        start = time.perf_counter()
        self.sink.write(text)
        self.sink.flush()
        if self.baud:
            end = start + len(text) * 10 / self.baud
            while time.perf_counter() < end:
                time.sleep(max(0.0, min(0.001, end - time.perf_counter())))


@dataclass
class UdpTrial:
    """One trial's two intervals and their parts (ms)."""

    thesis_ms: float
    livemig_ms: float
    capture_ms: float
    print_ms: float
    roundtrip_ms: float
    adopt_ms: float
    exact: bool


class UdpClient:
    """The source side: one UDP socket to the peer's, and the key."""

    def __init__(self, address: tuple[str, int], key: bytes) -> None:
        self.key = key
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(address)
        self.sock.settimeout(ACK_TIMEOUT)
        self.seq = 0

    def close(self) -> None:
        self.sock.send(seal(self.key, _HEAD.pack(b"E", self.seq)))
        self.sock.close()

    def trial(self, capture: Callable[[], list[dict[str, int]]], names: list[str],
              console: SerialConsole) -> UdpTrial:
        """Both intervals on one capture (the machine is paused by the caller)."""
        from livemig.bench.cpustate_wire import pack_registers

        self.seq += 1
        t0 = time.perf_counter()
        per_vcpu = capture()
        t1 = time.perf_counter()
        console.print_registers(per_vcpu, names)
        t2 = time.perf_counter()
        self.sock.send(seal(self.key, _HEAD.pack(b"T", self.seq) + thesis_buffer(per_vcpu, names)))
        t3 = time.perf_counter()
        payload = pack_registers(per_vcpu, names)
        self.sock.send(seal(self.key, _HEAD.pack(b"R", self.seq) + bytes([len(names)]) + payload))
        adopt_ms, digest = self._ack()
        t4 = time.perf_counter()
        return UdpTrial((t3 - t0) * 1e3, ((t1 - t0) + (t4 - t3)) * 1e3, (t1 - t0) * 1e3,
                        (t2 - t1) * 1e3, (t4 - t3) * 1e3, adopt_ms,
                        digest == short_digest(payload))

    def _ack(self) -> tuple[float, bytes]:
        deadline = time.monotonic() + ACK_TIMEOUT
        while time.monotonic() < deadline:
            try:
                body = opened(self.key, self.sock.recv(2048))
            except TimeoutError:
                break
            if body is None or len(body) != _HEAD.size + 8 + 16:
                continue
            kind, seq = _HEAD.unpack_from(body)
            if kind == b"A" and seq == self.seq:
                (adopt_ms,) = struct.unpack_from("<d", body, _HEAD.size)
                return adopt_ms, body[_HEAD.size + 8:]
        raise UdpError(f"no authenticated acknowledgement of datagram {self.seq} "
                       f"within {ACK_TIMEOUT:g} s")


def serve(sock: socket.socket, key: bytes, vcpus: int, thesis_order: tuple[str, ...],
          adopt: Callable[[list[str], bytes], tuple[float, bytes]]) -> dict[str, Any]:
    """The peer side: answer R datagrams (adopt, acknowledge) until E; counts what came.

    `adopt(names, values)` adopts the registers and returns (ms, the registers read back,
    packed like `values`).
    """
    counts = {"thesis": 0, "registers": 0, "dropped": 0}
    while True:
        datagram, addr = sock.recvfrom(65536)
        body = opened(key, datagram)
        if body is None:
            counts["dropped"] += 1
            continue
        kind, seq = _HEAD.unpack_from(body)
        if kind == b"E":
            return counts
        if kind == b"T":
            counts["thesis"] += 1
            continue
        if kind != b"R" or len(body) < _HEAD.size + 1:
            counts["dropped"] += 1
            continue
        n = body[_HEAD.size]
        values = body[_HEAD.size + 1:]
        if not 1 <= n <= len(thesis_order) or len(values) != 8 * n * vcpus:
            counts["dropped"] += 1
            continue
        counts["registers"] += 1
        adopt_ms, back = adopt(list(thesis_order[:n]), values)
        sock.sendto(seal(key, _HEAD.pack(b"A", seq) + struct.pack("<d", adopt_ms)
                         + short_digest(back)), addr)


def new_key() -> bytes:
    return os.urandom(32)
