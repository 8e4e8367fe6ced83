"""The control-socket commands `migrate`, `query-migrate` and `migrate-cancel` of a running
machine: one outgoing migration at a time, driven and watched through the control socket."""

from __future__ import annotations

import threading
from dataclasses import asdict
from typing import Any

from livemig.cli.runner import MachineHost
from livemig.control import ControlError
from livemig.migration import (
    CommitUnconfirmed,
    MigrationError,
    MigrationOptions,
    MigrationStats,
    Mode,
    Progress,
    migrate,
    parse_rate,
)
from livemig.migration.transport import connect

FINAL_STATUS_WAIT = 5.0  # seconds a migrated-away host waits for its final stats to be read


class MigrationControl:
    """One machine's outgoing migration, driven through its control socket."""

    def __init__(self, host: MachineHost) -> None:
        self.host = host
        self.thread: threading.Thread | None = None
        self.cancel = threading.Event()
        self.status = "none"
        self.progress: Progress | None = None
        self.stats: MigrationStats | None = None
        self.error: str | None = None
        self.connected = False  # this attempt reached its destination
        # Set when a client has read this attempt's final status; a new one for each attempt
        # (a failed attempt's must not let a later successful one exit before it is read).
        self.reported = threading.Event()

    def start(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.thread is not None and self.thread.is_alive():
            raise ControlError("a migration is already in progress")
        target = req.get("to")
        if not isinstance(target, str):
            raise ControlError("migrate needs 'to': HOST:PORT")
        opts = options_from_request(req)
        self.cancel = threading.Event()
        self.reported = threading.Event()
        self.connected = False
        self.status, self.progress, self.stats, self.error = "setup", None, None, None
        self.thread = threading.Thread(target=self._run, args=(target, opts, self.reported),
                                       name="migrate", daemon=True)
        self.thread.start()
        return {"status": self.status}

    def _run(self, target: str, opts: MigrationOptions, reported: threading.Event) -> None:
        with self.host.lock:
            try:
                sock = connect(target)
            except (OSError, ValueError) as e:
                why = (e.strerror if isinstance(e, OSError) else None) or str(e)
                self.status, self.error = "failed", f"cannot connect to {target}: {why}"
                return
            self.connected = True
            try:
                self.stats = migrate(self.host.machine, sock, opts, self._on_progress,
                                     self.cancel)
                self.status = "completed"
            except MigrationError as e:
                self.stats = getattr(e, "stats", None)
                self.status = self.stats.status if self.stats else "failed"
                self.error = str(e)
                if isinstance(e, CommitUnconfirmed):
                    self.status = "commit-unconfirmed"
            finally:
                sock.close()
        if self.status == "completed":
            # Let `livemig migrate` read the final stats before the source host goes away.
            reported.wait(FINAL_STATUS_WAIT)
            self.host.finish(f"migrated to {target}")

    def _on_progress(self, p: Progress) -> None:
        self.progress = p
        self.status = "active"

    def query(self, _req: dict[str, Any]) -> dict[str, Any]:
        if self.status not in ("setup", "active", "none"):
            self.reported.set()
        return {
            "status": self.status,
            "progress": asdict(self.progress) if self.progress else None,
            "stats": self.stats.to_json() if self.stats else None,
            "error": self.error,
            "connected": self.connected,
        }

    def do_cancel(self, _req: dict[str, Any]) -> dict[str, Any]:
        if self.thread is None or not self.thread.is_alive():
            raise ControlError("no migration in progress")
        self.cancel.set()
        return {"status": "cancelling"}


def options_from_request(req: dict[str, Any]) -> MigrationOptions:
    """MigrationOptions from a `migrate` control request; ControlError if a field is bad."""
    try:
        opts = MigrationOptions(mode=Mode(req.get("mode", "precopy")))
        if req.get("max_downtime_ms") is not None:
            opts.max_downtime_ms = float(req["max_downtime_ms"])
        if req.get("max_bandwidth") is not None:
            bw = req["max_bandwidth"]
            opts.max_bandwidth = parse_rate(bw) if isinstance(bw, str) else float(bw)
        if req.get("max_rounds") is not None:
            opts.max_rounds = int(req["max_rounds"])
        opts.auto_converge = bool(req.get("auto_converge", False))
        opts.verify_memory = bool(req.get("verify_memory", False))
    except (ValueError, TypeError) as e:
        raise ControlError(f"bad migrate option: {e}") from e
    if opts.max_rounds < 1 or opts.max_downtime_ms <= 0:
        raise ControlError("max_rounds must be >= 1 and max_downtime_ms > 0")
    return opts


def register_migration_controls(host: MachineHost) -> None:
    """Add `migrate`, `query-migrate` and `migrate-cancel` to the host's control socket.

    A completed migration ends the host's serve loop (which closes the paused machine)."""
    mc = MigrationControl(host)
    host.control.register("migrate", mc.start)
    host.control.register("query-migrate", mc.query)
    host.control.register("migrate-cancel", mc.do_cancel)


def outcome_line(q: dict[str, Any]) -> str:
    """One line for a migration that did not complete (a `query-migrate` answer): what
    happened, then what state each side is left in."""
    status = q.get("status") or "unknown"
    error = " ".join(str(q.get("error") or "no reason given").split())
    if error.startswith("migration failed: "):
        error = error[len("migration failed: "):]
    if status == "failed" and q.get("connected") is False:
        return f"{error}; nothing was sent, the source machine runs on"
    if status in ("failed", "cancelled"):
        left = "the source machine is running again"
    elif status in ("commit-unconfirmed", "commit-unknown"):
        left = ("both sides are paused: COMMIT was sent but not confirmed; see the error "
                "and the destination's log before resuming either")
    else:
        left = "the state of the source machine is unknown; check it with `livemig ctl status`"
    return f"migration {status}: {error}; {left}"
