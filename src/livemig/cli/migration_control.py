"""The control-socket commands `migrate`, `query-migrate` and `migrate-cancel` of a running
machine: one outgoing migration at a time, driven and watched through the control socket."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from livemig.cli.runner import MachineHost
from livemig.cli.security_opts import security_from_request
from livemig.control import ControlError
from livemig.migration import (
    CommitUnconfirmed,
    MigrationError,
    MigrationOptions,
    MigrationStats,
    Mode,
    Progress,
    parse_rate,
)
from livemig.migration.channels import Channel, Role
from livemig.migration.hotpages import check_k_n
from livemig.migration.resolve import ask
from livemig.migration.security import Security
from livemig.migration.source import Source
from livemig.migration.transport import dial, parse_address
from livemig.units import parse_size

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
        self.security = Security.insecure()
        self.redial: Callable[[Role], Channel] | None = None  # for migrate-resolve
        self.source: Source | None = None  # the attempt in progress (post-copy controls)
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
        try:
            self.security = security_from_request(req)
        except MigrationError as e:
            raise ControlError(str(e)) from e
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
            sec = self.security
            try:
                addr = parse_address(target)
                main = dial(addr, sec)
            except MigrationError as e:
                self.status, self.error = "failed", str(e)
                return
            self.connected = True
            self.redial = lambda role: dial(addr, sec, role)
            self.source = Source(self.host.machine, main, opts, self._on_progress, self.cancel,
                                 sec, self.redial)
            try:
                self.stats = self.source.run()
                self.status = "completed"
            except MigrationError as e:
                self.stats = e.stats
                self.status = self.stats.status if self.stats else "failed"
                self.error = str(e)
                if isinstance(e, CommitUnconfirmed):
                    self.status = "commit-unconfirmed"
            finally:
                main.close()
        if self.status == "completed":
            # Let `livemig migrate` read the final stats before the source host goes away.
            reported.wait(FINAL_STATUS_WAIT)
            self.host.finish(f"migrated to {target}")

    def _on_progress(self, p: Progress) -> None:
        self.progress = p
        if p.phase == "postcopy-paused":
            self.status, self.error = "postcopy-paused", p.note
            self.stats = self.source.stats if self.source is not None else None
        else:
            self.status = "active"

    def do_recover(self, req: dict[str, Any]) -> dict[str, Any]:
        """`migrate-recover`: reconnect a paused post-copy, to its destination or a new one."""
        if self.status != "postcopy-paused" or self.source is None:
            raise ControlError("no post-copy is paused waiting for recovery")
        redial = None
        target = req.get("to")
        if isinstance(target, str):
            try:
                addr = parse_address(target)
                given = any(req.get(k) for k in ("key_file", "tls_dir", "insecure"))
                sec = security_from_request(req) if given else self.security
            except MigrationError as e:
                raise ControlError(str(e)) from e
            redial = lambda role: dial(addr, sec, role)  # noqa: E731
        try:
            self.source.request_recovery(redial)
        except MigrationError as e:
            raise ControlError(str(e)) from e
        self.status, self.error = "active", None
        return {"status": "recovering"}

    def do_start_postcopy(self, _req: dict[str, Any]) -> dict[str, Any]:
        """`migrate-start-postcopy`: a hybrid migration switches to post-copy now."""
        if self.source is None or self.thread is None or not self.thread.is_alive():
            raise ControlError("no migration in progress")
        if not self.source.strategy.postcopy:
            raise ControlError("the migration in progress is not --mode hybrid or postcopy")
        self.source.start_postcopy.set()
        return {"status": "switching to post-copy"}

    def query(self, _req: dict[str, Any]) -> dict[str, Any]:
        if self.status not in ("setup", "active", "none", "postcopy-paused"):
            self.reported.set()  # a final status was read: the host may go
        status = self.status
        if status in ("setup", "active") and self.source is not None and (
                self.source.state.value == "postcopy-active"):
            status = self.source.state.value
        return {
            "status": status,
            "progress": asdict(self.progress) if self.progress else None,
            "stats": self.stats.to_json() if self.stats else None,
            "error": self.error,
            "connected": self.connected,
        }

    def do_resolve(self, _req: dict[str, Any]) -> dict[str, Any]:
        """After a lost COMMIT: ask the destination, then run exactly one copy here or there."""
        if self.status != "commit-unconfirmed" or self.redial is None or self.stats is None:
            raise ControlError("no migration is waiting for its COMMIT to be confirmed")
        try:
            committed = ask(self.redial, self.security, bytes.fromhex(self.stats.session))
        except MigrationError as e:
            raise ControlError(f"cannot ask the destination: {e}; both sides stay paused") from e
        if committed:
            self.status = "completed"
            self.stats.status = "completed"
            self.host.finish("migrated (confirmed by migrate-resolve)")
            return {"committed": True, "source": "stopped: the machine runs at the destination"}
        self.host.machine.resume()
        self.status = self.stats.status = "failed"
        self.error = "COMMIT never reached the destination, which discarded its copy"
        return {"committed": False, "source": "running again"}

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
        if req.get("switchover_timeout_s") is not None:
            opts.switchover_timeout_s = float(req["switchover_timeout_s"])
        if req.get("commit_timeout_s") is not None:
            opts.commit_timeout_s = float(req["commit_timeout_s"])
        _wire_options(opts, req)
        opts.ship_template = bool(req.get("ship_template", False))
        opts.hold_hot = bool(req.get("hold_hot", False))
        opts.hold_hot_k = int(req.get("hold_hot_k", opts.hold_hot_k))
        opts.hold_hot_n = int(req.get("hold_hot_n", opts.hold_hot_n))
        opts.skip_redirtied = bool(req.get("skip_redirtied", True))
        if req.get("postcopy_after") is not None:
            opts.postcopy_after = int(req["postcopy_after"])
            if opts.postcopy_after < 1:
                raise ValueError("postcopy_after must be >= 1")
        check_k_n(opts.hold_hot_k, opts.hold_hot_n)
        opts.soft_net = bool(req.get("soft_net", True))
    except (ValueError, TypeError) as e:
        raise ControlError(f"bad migrate option: {e}") from e
    if opts.max_rounds < 1 or opts.max_downtime_ms <= 0:
        raise ControlError("max_rounds must be >= 1 and max_downtime_ms > 0")
    return opts


COMPRESSIONS = ("zstd", "lz4", "auto")


def _wire_options(opts: MigrationOptions, req: dict[str, Any]) -> None:
    """--compress, --xbzrle, --xbzrle-cache, --dedup, --streams from a request."""
    compress = req.get("compress")
    if compress is not None and compress not in COMPRESSIONS:
        raise ValueError(f"compress must be one of {', '.join(COMPRESSIONS)}")
    opts.compress = compress
    opts.xbzrle = bool(req.get("xbzrle", False))
    if req.get("xbzrle_cache") is not None:
        cache = req["xbzrle_cache"]
        opts.xbzrle_cache = parse_size(cache) if isinstance(cache, str) else int(cache)
    opts.dedup = bool(req.get("dedup", False))
    opts.streams = int(req.get("streams", 1))
    if not 1 <= opts.streams <= 16:
        raise ValueError("streams must be 1..16")


def register_migration_controls(host: MachineHost) -> None:
    """Add `migrate`, `query-migrate` and `migrate-cancel` to the host's control socket.

    A completed migration ends the host's serve loop (which closes the paused machine)."""
    mc = MigrationControl(host)
    host.control.register("migrate", mc.start)
    host.control.register("query-migrate", mc.query)
    host.control.register("migrate-cancel", mc.do_cancel)
    host.control.register("migrate-resolve", mc.do_resolve)
    host.control.register("migrate-recover", mc.do_recover)
    host.control.register("migrate-start-postcopy", mc.do_start_postcopy)
    from livemig.cli.template_cmds import register_template_controls

    register_template_controls(host)


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
    elif status == "postcopy-paused":
        left = ("the guest runs at the destination and waits on pages it lacks; this source "
                "keeps every page: run `livemig migrate-recover SOCKET [--to HOST:PORT]`")
    elif status in ("commit-unconfirmed", "commit-unknown"):
        left = ("both sides are paused: COMMIT was sent but not confirmed; see the error "
                "and the destination's log before resuming either")
    else:
        left = "the state of the source machine is unknown; check it with `livemig ctl status`"
    return f"migration {status}: {error}; {left}"
