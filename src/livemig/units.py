"""Sizes and rates as people write them: one parser for every command and option.

Units are binary, as for RAM: K, M, G, T are 2^10, 2^20, 2^30, 2^40 (so 1G = 2^30 bytes), with
an optional `i` (`Gi`, the same thing) and an optional `B`; letters are case-insensitive. A rate
is a size per second, with an optional `/s` (`100M`, `1.5G/s`, `64MiB/s`).
"""

from __future__ import annotations

import re

SIZE_HELP = "K/M/G/T are binary: 1G = 2^30 bytes"

_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}
_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SIZE = re.compile(rf"\s*{_NUMBER}\s*(?:([kmgt])(i)?)?(b)?\s*", re.IGNORECASE)
_RATE = re.compile(rf"\s*{_NUMBER}\s*(?:([kmgt])(i)?)?(b)?\s*(/\s*s)?\s*", re.IGNORECASE)


def _value(m: re.Match[str]) -> float:
    return float(m.group(1)) * (1 << _SHIFT[(m.group(2) or "").lower()])


def parse_size(text: str) -> int:
    """`4096`, `512M`, `1G`, `64Ki`, `2GiB` -> bytes (binary units: 1G = 2^30 bytes).

    A fraction is allowed if it makes whole bytes (`1.5G`); ValueError (one line) otherwise."""
    m = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 512M, 1G, 64Ki; {SIZE_HELP})")
    value = _value(m)
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_rate(text: str) -> float:
    """`100M`, `1.5G`, `64MiB/s` -> bytes per second (binary units: 1G = 2^30 bytes/s).

    ValueError (one line) if it is not a rate or not positive."""
    m = _RATE.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{text!r} is not a rate (examples: 100M, 1G, 64MiB/s; {SIZE_HELP})")
    value = _value(m)
    if value <= 0:
        raise ValueError(f"a rate must be positive, got {text!r}")
    return value
