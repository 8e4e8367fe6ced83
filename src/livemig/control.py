"""The control socket of a running machine: JSON lines over a unix socket, QMP in spirit.

Each request is one JSON object with a `cmd` field; each answer is one JSON object with
`ok` (true/false) and either the command's fields or `error`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_REQUEST = 1 << 20


class ControlError(Exception):
    """A control command failed; the message goes back to the client as `error`."""


class ControlServer:
    """Accepts connections on a unix socket and dispatches commands to registered handlers."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._handlers: dict[str, Handler] = {}
        if os.path.exists(path):
            _remove_stale(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(8)
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)

    def register(self, name: str, fn: Handler) -> None:
        self._handlers[name] = fn

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                if len(line) > MAX_REQUEST:
                    reply: dict[str, Any] = {"ok": False, "error": "request too large"}
                else:
                    reply = self.dispatch(line)
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

    def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": "request must be an object with a string 'cmd'"}
        fn = self._handlers.get(req["cmd"])
        if fn is None:
            known = ", ".join(sorted(self._handlers))
            return {"ok": False, "error": f"unknown command {req['cmd']!r} (known: {known})"}
        try:
            return {"ok": True, **fn(req)}
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a handler bug must not kill the control socket
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to steal a live one."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ControlError(f"control socket {path} is in use by a running machine")


def request(sock_path: str, cmd: str, timeout: float | None = 30.0, **args: Any) -> dict[str, Any]:
    """Send one command to a control socket and return the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(sock_path)
        except OSError as e:
            raise ControlError(f"cannot reach control socket {sock_path}: {e.strerror or e}") from e
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        with s.makefile("rb") as f:
            line = f.readline()
    if not line:
        raise ControlError(f"control socket {sock_path} closed without an answer")
    reply: dict[str, Any] = json.loads(line)
    return reply
