"""The migration engine: channels, sessions, strategies, codecs, the two state machines.

It sees machines only through `livemig.contract`; it never imports a backend.

    from livemig.migration import migrate, receive, MigrationOptions, Mode
"""

from livemig.migration.destination import DestState, receive
from livemig.migration.errors import (
    AuthError,
    Cancelled,
    CommitUnconfirmed,
    ConnectionLost,
    MigrationError,
    ProtocolError,
    RemoteError,
    Timeout,
    VersionError,
)
from livemig.migration.options import MigrationOptions, Mode, parse_rate
from livemig.migration.security import Security
from livemig.migration.source import SourceState, migrate
from livemig.migration.stats import MigrationStats, Progress, RoundStats

__all__ = [
    "AuthError",
    "Cancelled",
    "CommitUnconfirmed",
    "ConnectionLost",
    "DestState",
    "MigrationError",
    "MigrationOptions",
    "MigrationStats",
    "Mode",
    "Progress",
    "ProtocolError",
    "RemoteError",
    "RoundStats",
    "Security",
    "SourceState",
    "Timeout",
    "VersionError",
    "migrate",
    "parse_rate",
    "receive",
]
