"""Channels: framed record streams with a role, one module per kind (docs/engine.md).

    Channel        the base: framing, a writer lock, per-channel byte counts, deadlines
    SocketChannel  TCP or unix stream socket (unix ones carry file descriptors)
    TlsChannel     a TLS connection (one direction at a time: never read and write at once)
    FileChannel    a snapshot file, written or read once from start to end
"""

from livemig.migration.channels.base import Channel, Role
from livemig.migration.channels.file import FileChannel
from livemig.migration.channels.sockets import SocketChannel
from livemig.migration.channels.tls import TlsChannel

__all__ = ["Channel", "FileChannel", "Role", "SocketChannel", "TlsChannel"]
