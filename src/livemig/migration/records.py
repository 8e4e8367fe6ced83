"""Payloads of the small msgpack records (CONFIG, ROUND_END, ROUND_ACK, STATE, REPORT)."""

from __future__ import annotations

from typing import Any

import msgpack

from livemig.migration.errors import ProtocolError


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(payload: bytes | memoryview, what: str, required: tuple[str, ...] = ()) -> dict:
    """Decode a msgpack map payload; ProtocolError if it is not one or lacks a key."""
    try:
        obj = msgpack.unpackb(bytes(payload), raw=False, strict_map_key=False)
    except Exception as e:
        raise ProtocolError(f"malformed {what} record: {e}") from e
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed {what} record: not a map")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ProtocolError(f"{what} record lacks {', '.join(missing)}")
    return obj
