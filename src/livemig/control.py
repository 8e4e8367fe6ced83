"""The control socket of a running machine: JSON lines over a unix socket, QMP in spirit.

Each request is one JSON object with a `cmd` field; each answer is one JSON object with
`ok` (true/false) and either the command's fields or `error`.

Only the user the machine runs as may use it: the socket is created mode 0600, by default in a
directory only that user can enter (`$XDG_RUNTIME_DIR/livemig/`, else `/tmp/livemig-UID/`),
and the server checks every client's uid (SO_PEERCRED) against its own effective uid.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_REQUEST = 1 << 20
REPLY_GRACE = 2.0  # seconds close() waits for replies being written
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(Exception):
    """A control command failed; the message goes back to the client as `error`."""


def default_control_dir() -> str:
    """The private directory for control sockets, created (mode 0700) if needed:
    `$XDG_RUNTIME_DIR/livemig/` when that is set, else `/tmp/livemig-UID/`. ControlError if
    it exists but is a symlink, not a directory, not ours, or open to group or others."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(runtime, "livemig") if runtime else f"/tmp/livemig-{os.geteuid()}"
    ensure_private_dir(path)
    return path


def ensure_private_dir(path: str) -> None:
    """Create `path` mode 0700, or check that the existing one is ours and private."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
        return
    except FileExistsError:
        pass
    except OSError as e:
        raise ControlError(f"cannot create control directory {path}: {e.strerror or e}") from e
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise ControlError(f"control directory {path} is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"control directory {path} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise ControlError(f"control directory {path} belongs to uid {st.st_uid}, "
                           f"not to us (uid {os.geteuid()}); refusing to use it")
    if st.st_mode & 0o077:
        raise ControlError(f"control directory {path} is open to other users "
                           f"(mode {stat.S_IMODE(st.st_mode):04o}, must be 0700); "
                           f"refusing to use it")


def check_control_path(path: str) -> None:
    """Refuse, before anything is started, a control path that cannot become our socket:
    a missing parent directory, something there that is not a socket, a live socket."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ControlError(f"cannot create control socket {path}: directory {parent} "
                           f"does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ControlError(f"cannot use control socket path {path}: {e.strerror or e}") from e
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket")
    _check_not_live(path)


class ControlServer:
    """Accepts connections on a unix socket and dispatches commands to registered handlers."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._handlers: dict[str, Handler] = {}
        check_control_path(path)
        try:  # a stale socket file: nobody listens on it (checked just above)
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ControlError(f"cannot replace stale control socket {path}: "
                               f"{e.strerror or e}") from e
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            self._sock.bind(path)
        except OSError as e:
            self._sock.close()
            raise ControlError(f"cannot create control socket {path}: {e.strerror or e}") from e
        finally:
            os.umask(old)
        self._sock.listen(8)
        self._uid = os.geteuid()
        self._closed = False
        # Requests being answered: close() lets their replies go out first (a handler may
        # end the process, as a migrated-away host does once its final status is read).
        self._answering = 0
        self._answered = threading.Condition()
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)

    def register(self, name: str, fn: Handler) -> None:
        self._handlers[name] = fn

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop accepting; replies being written are given up to REPLY_GRACE to go out."""
        self._closed = True
        with self._answered:
            self._answered.wait_for(lambda: self._answering == 0, REPLY_GRACE)
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

    def _peer_uid(self, conn: socket.socket) -> int:
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return int(_UCRED.unpack(cred)[1])

    def _refuse(self, conn: socket.socket, uid: int) -> None:
        sys.stderr.write(f"livemig: control: refused a client with uid {uid}\n")
        sys.stderr.flush()
        reply = {"ok": False, "error": f"this control socket admits only uid {self._uid}, "
                                       f"not uid {uid}"}
        try:
            conn.settimeout(2)
            conn.sendall(json.dumps(reply).encode() + b"\n")
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            uid = self._peer_uid(conn)
        except OSError:
            conn.close()
            return
        if uid != self._uid:
            self._refuse(conn, uid)
            return
        try:
            with conn, conn.makefile("rwb") as f:
                for line in f:
                    with self._answered:
                        self._answering += 1
                    try:
                        if len(line) > MAX_REQUEST:
                            reply: dict[str, Any] = {"ok": False, "error": "request too large"}
                        else:
                            reply = self.dispatch(line)
                        f.write(json.dumps(reply).encode() + b"\n")
                        f.flush()
                    finally:
                        with self._answered:
                            self._answering -= 1
                            self._answered.notify_all()
        except OSError:
            pass  # the client went away

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


def _check_not_live(path: str) -> None:
    """Refuse to steal a socket somebody listens on; a stale one may be replaced."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return
        raise ControlError(f"cannot tell whether control socket {path} is in use: "
                           f"{e.strerror or e}") from e
    finally:
        probe.close()
    raise ControlError(f"control socket {path} is in use by a running machine")


def request(sock_path: str, cmd: str, timeout: float | None = 30.0, **args: Any) -> dict[str, Any]:
    """Send one command to a control socket and return the answer; ControlError (one line)
    if the socket cannot be reached or does not answer with a JSON object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(sock_path)
        except OSError as e:
            raise ControlError(f"cannot reach control socket {sock_path}: {e.strerror or e}") from e
        try:
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        except OSError:
            pass  # a refusing server may close at once: its answer is still there to read
        try:
            with s.makefile("rb") as f:
                line = f.readline()
        except OSError as e:
            raise ControlError(f"control socket {sock_path} failed: {e.strerror or e}") from e
    if not line:
        raise ControlError(f"control socket {sock_path} closed without an answer")
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise ControlError(f"control socket {sock_path} answered something that is not "
                           f"a JSON object: {line[:80]!r}")
    return reply
