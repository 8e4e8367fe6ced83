"""A shorter GIL switch interval while a post-copy serves faults.

A thread woken by a fault (or by the page answering it) waits for the GIL behind any thread
busy in Python, up to the interpreter's switch interval: 5 ms by default, which would be the
fault latency whenever pushes are being placed. While post-copy runs the interval is cut to
`INTERVAL`; the previous value comes back when the last user is done.
"""

from __future__ import annotations

import sys
import threading

INTERVAL = 0.0001  # seconds

_lock = threading.Lock()
_users = 0
_saved = 0.005


def acquire() -> None:
    """Start a stretch of latency-sensitive work (nests: one `release` each)."""
    global _users, _saved
    with _lock:
        if _users == 0:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(INTERVAL)
        _users += 1


def release() -> None:
    global _users
    with _lock:
        if _users > 0:
            _users -= 1
            if _users == 0:
                sys.setswitchinterval(_saved)
