"""File channels: a machine on disk is the same record stream as on the wire."""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

from livemig.migration.channels.base import Channel, Role
from livemig.migration.errors import ConnectionLost


class _FileSource:
    """Gives a file the `recv_into` a RecordReader reads with."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def recv_into(self, view: memoryview) -> int:
        return self.f.readinto(view) or 0  # type: ignore[attr-defined]

    def fileno(self) -> int:
        return self.f.fileno()


class FileChannel(Channel):
    """A snapshot file: written by a source, or read by a destination; never both."""

    kind = "file"
    duplex = False

    def __init__(self, f: BinaryIO, writing: bool) -> None:
        super().__init__(Role.MAIN, None if writing else _FileSource(f))
        self.f = f

    def _write(self, bufs: Sequence[bytes | memoryview], deadline: float | None) -> int:
        total = 0
        try:
            for b in bufs:
                total += self.f.write(b)
        except OSError as e:
            raise ConnectionLost(f"cannot write the snapshot: {e.strerror or e}") from e
        return total

    def close(self) -> None:
        self.f.close()
