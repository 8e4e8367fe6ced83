"""The small protocol between `livemig bench cpu-state` and its destination peer.

Each message is a 4-byte big-endian length followed by a msgpack map (no pickle). Source to
peer:

- ``{"op": "hello", "config": MachineConfig.to_dict()}``: build an empty ARMv8 machine of that
  config; reply ``{"ok": true, "cpu_model": ..., "pid": ...}``.
- ``{"op": "regs", "names": [...], "values": bytes}``: ``values`` holds, vCPU after vCPU, one
  little-endian u64 per name (the thesis' flat register array). The peer adopts them into its
  vCPUs, replies ``{"ok": true, "adopt_ms": ...}`` at once (the acknowledgement the source
  times), then reads the registers back and sends ``{"digest": hex}`` of the read-back values
  packed the same way.
- ``{"op": "state", "state": MachineState.encode()}``: the full state; the peer loads it,
  acknowledges, then sends the digest of ``vcpus_digest(save_state())``.
- ``{"op": "bye"}``: close the machine and the connection.

Any failure is answered ``{"ok": false, "error": message}``.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import Any

import blake3
import msgpack

from livemig.contract import MachineState

LENGTH = struct.Struct(">I")
MAX_MESSAGE = 16 << 20


class PeerError(Exception):
    """The peer broke the protocol, went away, or reported a failure."""


def send_msg(sock: socket.socket, msg: dict[str, Any]) -> None:
    """Send one framed msgpack message."""
    body = msgpack.packb(msg, use_bin_type=True)
    sock.sendall(LENGTH.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise PeerError("connection closed in the middle of a message")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket) -> dict[str, Any]:
    """Receive one framed message; PeerError on a closed, oversized or malformed one."""
    (n,) = LENGTH.unpack(_recv_exact(sock, LENGTH.size))
    if n > MAX_MESSAGE:
        raise PeerError(f"message of {n} bytes is larger than {MAX_MESSAGE}")
    try:
        msg = msgpack.unpackb(_recv_exact(sock, n), raw=False)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise PeerError(f"message is not valid msgpack: {e}") from e
    if not isinstance(msg, dict):
        raise PeerError("message is not a map")
    return msg


def pack_registers(per_vcpu: Sequence[dict[str, int]], names: Sequence[str]) -> bytes:
    """The flat little-endian u64 array: vCPU 0's registers in `names` order, then vCPU 1's..."""
    flat = [regs[n] for regs in per_vcpu for n in names]
    return struct.pack(f"<{len(flat)}Q", *flat)


def unpack_registers(data: bytes, names: Sequence[str], vcpus: int) -> list[dict[str, int]]:
    """Inverse of `pack_registers`; PeerError when the size does not match."""
    if len(data) != 8 * len(names) * vcpus:
        raise PeerError(f"{len(data)} bytes of registers, expected "
                        f"{8 * len(names) * vcpus} ({len(names)} x {vcpus} vCPUs)")
    flat = struct.unpack(f"<{len(names) * vcpus}Q", data)
    k = len(names)
    return [dict(zip(names, flat[i * k:(i + 1) * k], strict=True)) for i in range(vcpus)]


def digest(data: bytes) -> str:
    """Hex BLAKE3 of some bytes: what both sides compare to prove the values are identical."""
    return blake3.blake3(data).hexdigest()


def vcpus_digest(state: MachineState) -> str:
    """Digest of every vCPU's register map (VM-level fields such as the counter excluded)."""
    return digest(msgpack.packb(state.vcpus, use_bin_type=True))
