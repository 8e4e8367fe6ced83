"""The migration engine: wire protocol, source and destination state machines, strategies.

It sees machines only through `livemig.contract`; it never imports a backend.

    from livemig.migration import migrate, receive, MigrationOptions, Mode
"""

from livemig.migration.destination import DestState, receive
from livemig.migration.errors import (
    Cancelled,
    CommitUnconfirmed,
    ConnectionLost,
    MigrationError,
    ProtocolError,
    RemoteError,
    VersionError,
)
from livemig.migration.options import MigrationOptions, Mode, parse_rate
from livemig.migration.source import SourceState, migrate
from livemig.migration.stats import MigrationStats, Progress, RoundStats

__all__ = [
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
    "SourceState",
    "VersionError",
    "migrate",
    "parse_rate",
    "receive",
]
