"""Snapshot files: a machine on disk is the engine's stop-and-copy stream (docs/snapshot.md).

`write` runs the stop-and-copy strategy into a file channel: HELLO (what the file holds),
CONFIG, PAGES ... ROUND_END, STATE, COMMIT, every record framed and CRC-checked as on the
wire. `read` walks the whole file and checks every record, its order and the final COMMIT
before anything is built; `restore` then replays it through the destination state machine.
Files of the earlier format (magic `LIVEMIGS`, version 1) are refused with a clear message.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from livemig.contract import Machine, MachineConfig, MachineError, MachineState
from livemig.migration import records
from livemig.migration.channels import FileChannel
from livemig.migration.destination import Destination
from livemig.migration.errors import MigrationError
from livemig.migration.options import MigrationOptions, Mode
from livemig.migration.session import open_file_reader
from livemig.migration.source import Source
from livemig.migration.wire import RecordType

LEGACY_MAGIC = b"LIVEMIGS"
LEGACY_HEADER = struct.Struct("<8sIIQQQQ16s")
ORDER = {RecordType.HELLO: 0, RecordType.CONFIG: 1, RecordType.PAGES: 2, RecordType.ROUND_END: 2,
         RecordType.STATE: 3, RecordType.COMMIT: 4}


class SnapshotError(MachineError):
    """A snapshot file is missing, damaged or of another format version."""


@dataclass
class Snapshot:
    """A snapshot read and checked from end to end, ready to be restored."""

    config: MachineConfig
    state: MachineState
    path: Path


def write(machine: Machine, path: str) -> int:
    """Write `machine` to a new file `path` (paused while writing: it stays paused, the
    caller resumes it); returns the bytes written."""
    with open(path, "wb") as f:
        chan = FileChannel(f, writing=True)
        try:
            Source(machine, chan, MigrationOptions(mode=Mode.STOP_COPY), to_file=True).run()
        except MigrationError as e:
            raise SnapshotError(f"cannot write snapshot {path}: {e}") from e
        return f.tell()


def _open(path: str) -> FileChannel:
    p = Path(path)
    if p.is_dir():
        raise SnapshotError(f"snapshot {path} is a directory")
    if not p.is_file():
        raise SnapshotError(f"snapshot {path} does not exist")
    f = open(p, "rb")  # noqa: SIM115 - the channel closes it
    head = f.read(LEGACY_HEADER.size)
    if head[:8] == LEGACY_MAGIC and len(head) == LEGACY_HEADER.size:
        f.close()
        version = LEGACY_HEADER.unpack(head)[1]
        raise SnapshotError(f"snapshot format version {version} is not supported: this livemig "
                            "writes and reads snapshots as migration streams (save it again)")
    f.seek(0)
    return FileChannel(f, writing=False)


def read(path: str) -> Snapshot:
    """Check every record of a snapshot; SnapshotError with the reason if it is unusable."""
    chan = _open(path)
    config: MachineConfig | None = None
    state: MachineState | None = None
    try:
        open_file_reader(chan)
        stage = 0
        while True:
            rec = chan.read()
            rank = ORDER.get(rec.type)
            if rank is None or rank < stage:
                raise SnapshotError(f"snapshot {path} is damaged: {rec.type.name} out of place")
            stage = rank
            if rec.type is RecordType.CONFIG:
                d = records.unpack(rec.payload, "CONFIG", ("machine",))
                config = MachineConfig.from_dict(d["machine"])
            elif rec.type is RecordType.STATE:
                state = MachineState.decode(records.unpack(rec.payload, "STATE", ("state",))
                                            ["state"])
            elif rec.type is RecordType.COMMIT:
                break
    except MigrationError as e:
        if "CRC mismatch" in str(e):
            raise SnapshotError(f"snapshot {path} is damaged: its checksum does not match "
                                f"({e})") from e
        raise SnapshotError(f"snapshot {path} is unusable: {e}") from e
    finally:
        chan.close()
    if config is None or state is None:
        raise SnapshotError(f"snapshot {path} is damaged: it lacks its config or state")
    return Snapshot(config, state, Path(path))


def restore(snap: Snapshot, build: Callable[[MachineConfig], Machine]) -> Machine:
    """Replay a checked snapshot into a new machine, made by `build`; the caller starts it."""
    chan = _open(str(snap.path))
    try:
        sess = open_file_reader(chan)
        machine, _stats = Destination(sess, build).run()
    except MigrationError as e:
        raise SnapshotError(f"cannot restore {snap.path}: {e}") from e
    finally:
        chan.close()
    return machine
