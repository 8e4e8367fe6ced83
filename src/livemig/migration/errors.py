"""Errors of the migration engine; every message is meant for the user as is."""

from __future__ import annotations


class MigrationError(Exception):
    """Base of every migration failure."""


class ProtocolError(MigrationError):
    """The peer sent something this side cannot accept (corrupt, unknown, out of order...)."""


class VersionError(ProtocolError):
    """The peers share no protocol version."""


class RemoteError(MigrationError):
    """The peer reported a failure of its own (an ERROR or ABORT record)."""


class ConnectionLost(MigrationError):
    """The connection closed or failed before the migration completed."""


class Cancelled(MigrationError):
    """The migration was cancelled on request; the source machine keeps running."""


class CommitUnconfirmed(MigrationError):
    """COMMIT was sent but RUNNING never came back: both sides stay paused.

    The source will not resume by itself, since the destination may be running; an operator
    must find out which copy is alive.
    """
