"""Snapshot files: RAM and state of a machine, written while it is paused (docs/snapshot.md).

Layout, little-endian:

    header   64 bytes  magic b"LIVEMIGS", u32 format version, u32 flags (0),
                       u64 config length, u64 state length, u64 RAM size, u64 stored pages,
                       16 bytes reserved (zero)
    config   msgpack   MachineConfig.to_dict()
    state    msgpack   MachineState.encode()
    index    u64 * n   RAM page numbers stored, ascending (all other pages are zero)
    pages    4096 * n  their contents
    digest   32 bytes  BLAKE3 of everything above

A reader checks the magic, the version and the digest before it changes anything.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import blake3
import msgpack
import numpy as np

from livemig.contract import (
    PAGE_SIZE,
    GuestMemory,
    Machine,
    MachineConfig,
    MachineError,
    MachineState,
)
from livemig.migration import scan

MAGIC = b"LIVEMIGS"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQQQQ16s")
DIGEST_SIZE = 32
CHUNK_PAGES = 4096  # pages written per write call


class SnapshotError(MachineError):
    """A snapshot file is missing, damaged or of another format version."""


@dataclass
class Snapshot:
    """A snapshot read and verified, ready to be put into a new machine."""

    config: MachineConfig
    state: MachineState
    path: Path
    ram_size: int
    pages_offset: int
    index: np.ndarray


def nonzero_pages(memory: GuestMemory) -> np.ndarray:
    """Indices of pages that hold anything but zeros; RAM never written is not even read."""
    pages = np.frombuffer(memory.view(), dtype=np.uint8).reshape(-1, PAGE_SIZE)
    return scan.nonzero_pages(pages, scan.populated(memory)).astype(np.uint64)


def write(machine: Machine, path: str) -> int:
    """Write a paused machine to `path` (atomically, via a temporary file); returns bytes."""
    state = machine.save_state().encode()
    config = msgpack.packb(machine.config.to_dict())
    ram = machine.memory.view()
    index = nonzero_pages(machine.memory)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(config), len(state),
                         machine.memory.size, len(index), bytes(16))
    tmp = f"{path}.tmp-{os.getpid()}"
    digest = blake3.blake3()
    with open(tmp, "wb") as f:
        for part in (header, config, state, index.tobytes()):
            f.write(part)
            digest.update(part)
        pages = np.frombuffer(ram, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        for start in range(0, len(index), CHUNK_PAGES):
            chunk = pages[index[start:start + CHUNK_PAGES]].tobytes()
            f.write(chunk)
            digest.update(chunk)
        f.write(digest.digest())
        size = f.tell()
    os.replace(tmp, path)
    return size


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise SnapshotError(f"snapshot is truncated in its {what}")
    return data


def _check_digest(path: Path, size: int) -> None:
    h = blake3.blake3()
    with open(path, "rb") as f:
        remaining = size - DIGEST_SIZE
        while remaining:
            block = f.read(min(remaining, 16 << 20))
            if not block:
                raise SnapshotError("snapshot is truncated")
            h.update(block)
            remaining -= len(block)
        if f.read(DIGEST_SIZE) != h.digest():
            raise SnapshotError(f"snapshot {path} is damaged: its checksum does not match")


def read(path: str) -> Snapshot:
    """Open and verify a snapshot; raises SnapshotError with the reason when it is unusable."""
    p = Path(path)
    if not p.is_file():
        raise SnapshotError(f"snapshot {path} does not exist")
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(HEADER.size)
        if len(raw) < HEADER.size or raw[:8] != MAGIC:
            raise SnapshotError(f"{path} is not a livemig snapshot")
        _, version, _flags, clen, slen, ram_size, npages, _ = HEADER.unpack(raw)
        if version != FORMAT_VERSION:
            raise SnapshotError(f"snapshot format version {version} is not supported "
                                f"(this livemig reads version {FORMAT_VERSION})")
        expect = HEADER.size + clen + slen + npages * (8 + PAGE_SIZE) + DIGEST_SIZE
        if expect != size:
            raise SnapshotError(f"snapshot {path} is damaged: {size} bytes, header says {expect}")
        _check_digest(p, size)
        try:
            config = MachineConfig.from_dict(msgpack.unpackb(_read_exact(f, clen, "config")))
        except (ValueError, msgpack.UnpackException) as e:
            raise SnapshotError(f"snapshot config is unreadable: {e}") from e
        state = MachineState.decode(_read_exact(f, slen, "state"))
        index = np.frombuffer(_read_exact(f, npages * 8, "page index"), dtype=np.uint64)
    if config.mem_size != ram_size or (len(index) and int(index.max()) >= ram_size // PAGE_SIZE):
        raise SnapshotError("snapshot page index does not fit its RAM size")
    return Snapshot(config, state, p, ram_size, HEADER.size + clen + slen + npages * 8, index)


def restore_into(snap: Snapshot, machine: Machine) -> None:
    """Load the snapshot's state into a new machine, then its RAM (the machine is not started).

    State goes first: a state the machine refuses leaves its RAM untouched.
    """
    machine.load_state(snap.state)
    pages = np.frombuffer(machine.memory.view(), dtype=np.uint8).reshape(-1, PAGE_SIZE)
    with open(snap.path, "rb") as f:
        f.seek(snap.pages_offset)
        for start in range(0, len(snap.index), CHUNK_PAGES):
            idx = snap.index[start:start + CHUNK_PAGES]
            data = _read_exact(f, len(idx) * PAGE_SIZE, "pages")
            pages[idx] = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
