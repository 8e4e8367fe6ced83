"""A machine process: one machine, its console, and its control socket.

`livemig run`, `livemig restore` and `livemig listen` all end up here: a `MachineHost` owns a
started machine and serves control commands until the guest dies, `quit` is asked, or the
machine has migrated away.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from livemig import snapshot
from livemig.contract import Arch, ConfigError, Machine, MachineConfig, MachineError
from livemig.control import ControlError, ControlServer, check_control_path, default_control_dir
from livemig.outpath import OutputPathError, claim_output_path

ConsoleSink = Callable[[bytes], None]


def build_machine(config: MachineConfig, console: ConsoleSink | None,
                  taps: Sequence[str] = ()) -> Machine:
    """Create an empty machine of the backend the config's architecture needs; `taps` are
    this host's TAP devices for the config's NICs."""
    if config.arch is Arch.X86_64:
        from livemig.machine import KvmMachine
        return KvmMachine(config, console, taps)
    if config.nics or taps:
        raise ConfigError("the arm64 board has no NIC (--net is for x86_64 machines)")
    from livemig.arm import Armv8Machine
    machine: Machine = Armv8Machine(config, console)
    return machine


def preload_backends() -> None:
    """Import the machine backends now, so that a migration arriving later does not pay for
    the imports inside its setup time, and prepare the process for KVM machines on the main
    thread (the listener builds machines on its connection threads)."""
    for name in ("livemig.machine", "livemig.arm"):
        importlib.import_module(name)
    from livemig.machine import prepare_process
    prepare_process()


def open_console(spec: str | None) -> tuple[ConsoleSink | None, Callable[[], None]]:
    """A sink for guest console bytes: `-` (stdout), `none`, `unix:PATH`, `tcp:HOST:PORT`,
    or a file path (appended). Returns the sink and a function that closes it."""
    if spec in (None, "-", "stdout"):
        out = sys.stdout.buffer

        def to_stdout(data: bytes) -> None:
            out.write(data)
            out.flush()
        return to_stdout, lambda: None
    if spec == "none":
        return None, lambda: None
    if spec.startswith(("unix:", "tcp:")):
        return _socket_console(spec)
    try:
        f: BinaryIO = open(spec, "ab", buffering=0)  # noqa: SIM115 - closed by the closer
    except OSError as e:
        why = "is a directory" if os.path.isdir(spec) else f"cannot be opened: {e.strerror or e}"
        raise MachineError(f"console file {spec} {why}") from e

    def to_file(data: bytes) -> None:
        f.write(data)
    return to_file, f.close


def _socket_console(spec: str) -> tuple[ConsoleSink, Callable[[], None]]:
    kind, _, where = spec.partition(":")
    try:
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(where)
        else:
            host, _, port = where.rpartition(":")
            s = socket.create_connection((host, int(port)), timeout=5)
    except (OSError, ValueError) as e:
        raise MachineError(f"cannot open console {spec}: {e}") from e

    def send(data: bytes) -> None:
        try:
            s.sendall(data)
        except OSError:
            pass  # a console reader going away must not stop the guest
    return send, s.close


def default_control_path() -> str:
    """`PID.sock` in the private control directory (created if needed; ControlError if it is
    not private)."""
    return os.path.join(default_control_dir(), f"{os.getpid()}.sock")


def prepare_control_path(path: str | None) -> str:
    """The control socket path to use, checked before any machine is built: the default one,
    or `path` if it can become a socket (ControlError, one line, otherwise)."""
    if path is None:
        return default_control_path()
    check_control_path(path)
    return path


class MachineHost:
    """Serves a machine's control socket until the machine stops or leaves."""

    def __init__(self, machine: Machine, control_path: str,
                 close_console: Callable[[], None] = lambda: None) -> None:
        self.machine = machine
        self.control = ControlServer(control_path)
        self._done = threading.Event()
        self.exit_reason = ""
        self._close_console = close_console
        self.lock = threading.Lock()  # serialises pause/resume/save against migrations
        for name, fn in (("status", self._status), ("pause", self._pause),
                         ("resume", self._resume), ("save", self._save), ("quit", self._quit)):
            self.control.register(name, fn)

    def finish(self, reason: str) -> None:
        """End the serve loop (after quit, a guest failure, or a completed migration)."""
        if not self.exit_reason:
            self.exit_reason = reason
        self._done.set()

    def serve(self) -> str:
        """Run until finished; returns why. Ctrl-C ends it cleanly."""
        self.control.start()
        stopped = getattr(self.machine, "stopped", None)
        try:
            while not self._done.wait(0.2):
                if stopped is not None and stopped.is_set():
                    self.finish(f"guest stopped: {getattr(self.machine, 'error', None)}")
        except KeyboardInterrupt:
            self.finish("interrupted")
        finally:
            self.control.close()
            self.machine.close()
            self._close_console()
        return self.exit_reason

    def _status(self, _req: dict[str, Any]) -> dict[str, Any]:
        m = self.machine
        cfg = m.config
        return {
            "state": "running" if m.running else "paused",
            "arch": cfg.arch.value, "mem_size": cfg.mem_size, "vcpus": cfg.vcpus,
            "image": cfg.image, "cmdline": cfg.cmdline, "pid": os.getpid(),
            "error": getattr(m, "error", None), "probe": m.probe.summary(),
        }

    def _pause(self, _req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.machine.pause()
        return {"state": "paused"}

    def _resume(self, _req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            try:
                self.machine.resume()
            except MachineError as e:
                raise ControlError(str(e)) from e
        return {"state": "running"}

    def _save(self, req: dict[str, Any]) -> dict[str, Any]:
        """Write a snapshot to `path`: absolute, not an existing file (see livemig.outpath).
        The guest is paused while its state is written; with `stop` it stays paused and the
        host ends, unless the save failed."""
        path = req.get("path")
        if not isinstance(path, str) or not path:
            raise ControlError("save needs a 'path'")
        stop = bool(req.get("stop"))
        with self.lock:
            was_running = self.machine.running
            try:
                with claim_output_path(path) as tmp:
                    t0 = time.monotonic()
                    self.machine.pause()
                    try:
                        size = snapshot.write(self.machine, tmp)
                    finally:
                        paused_ms = (time.monotonic() - t0) * 1000
                        if was_running and not stop:
                            self.machine.resume()
            except Exception as e:
                if was_running and stop:
                    self.machine.resume()
                if isinstance(e, OutputPathError):
                    raise ControlError(f"cannot save to {path}: {e}") from e
                if isinstance(e, OSError):
                    raise ControlError(f"cannot save to {path}: {e.strerror or e}") from e
                raise
        if stop:
            self.finish("saved and stopped")
        return {"path": path, "bytes": size, "paused_ms": round(paused_ms, 1)}

    def _quit(self, _req: dict[str, Any]) -> dict[str, Any]:
        self.finish("quit")
        return {}
