"""Errors of the migration engine; every message is meant for the user as is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from livemig.migration.stats import MigrationStats


class MigrationError(Exception):
    """Base of every migration failure; `stats` holds what the migration did before it."""

    def __init__(self, message: str, stats: MigrationStats | None = None) -> None:
        super().__init__(message)
        self.stats = stats


class ProtocolError(MigrationError):
    """The peer sent something this side cannot accept (corrupt, unknown, out of order...)."""


class VersionError(ProtocolError):
    """The peers share no protocol version."""


class AuthError(MigrationError):
    """The peer could not prove it holds the key or certificate this side requires."""


class InternalError(MigrationError):
    """A bug met while handling the peer's input: the peer is told only that; `detail` (the
    exception's type and text) is for this side's log."""

    def __init__(self, detail: str, stats: MigrationStats | None = None) -> None:
        super().__init__("destination failed: internal error (details in its log)", stats)
        self.detail = detail


class RemoteError(MigrationError):
    """The peer reported a failure of its own (an ERROR or ABORT record)."""


class ConnectionLost(MigrationError):
    """The connection closed or failed before the migration completed."""


class Timeout(ConnectionLost):
    """The peer sent or took nothing for longer than allowed (a stalled or idle link)."""


class SwitchoverTimeout(Timeout):
    """The guest stayed paused for the whole switch-over limit without READY: given up."""


class Cancelled(MigrationError):
    """The migration was cancelled on request; the source machine keeps running."""


class CommitUnconfirmed(MigrationError):
    """COMMIT was sent (source) or may have been (destination), but the outcome is unknown.

    The source will not resume by itself, since the destination may be running; the resolve
    step (`livemig ctl SOCK migrate-resolve`) asks the destination and runs exactly one copy.
    `machine` is the destination's paused copy when the destination raises it.
    """

    def __init__(self, message: str, stats: MigrationStats | None = None,
                 machine: Any = None) -> None:
        super().__init__(message, stats)
        self.machine = machine
