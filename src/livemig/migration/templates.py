"""Templates: a machine's memory and state on disk, for clones to map copy-on-write.

A template is a directory of two files:

    memory         RAM, exactly mem_size bytes, sparse: only runs of non-zero pages are data
                   (a hole reads as zeroes); read-only, since every clone maps it
    template.meta  msgpack {"format": 1, "content_id": hex, "config": MachineConfig.to_dict(),
                   "state": MachineState.encode() bytes, "probe": ProbeLog.state(),
                   "parent": content id of the template the machine was cloned from, or nil,
                   "data_pages": count}

The content id names a template wherever it is: BLAKE3 in its key-derivation mode (context
CONTEXT, so that no other livemig digest can equal it) of the config, the state and every
non-zero page with its number. It does not depend on how the file is laid out (a zero page
stored as data or as a hole hashes the same). A destination finds templates by content id and
checks the digest before it maps one: a template whose files were changed is refused.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import msgpack
import numpy as np

from livemig import contract
from livemig.contract import PAGE_SIZE, BackingKind, MachineConfig, MachineError, MemoryBacking
from livemig.extents import data_pages, runs
from livemig.migration.scan import nonzero_in, populated

FORMAT = 1
CONTEXT = "livemig 2026 template content id v1"
MEMORY, META = "memory", "template.meta"
_RUN = struct.Struct("<QQ")
CHUNK_PAGES = 8192  # 32 MiB scanned for zero pages at a time
MAX_META = 64 << 20


class TemplateError(MachineError):
    """A template is missing, damaged, tampered with or does not fit (one line for the user)."""


@dataclass
class Template:
    """A template read from disk (its content id not yet checked unless `verified`)."""

    path: Path
    content_id: str
    config: MachineConfig
    state: bytes
    probe: dict[str, Any]
    parent: str | None
    data_pages: int

    @property
    def memory_path(self) -> Path:
        return self.path / MEMORY

    def backing(self) -> MemoryBacking:
        """RAM for a clone: this template's memory, mapped copy-on-write."""
        return MemoryBacking(BackingKind.TEMPLATE, path=str(self.memory_path))

    def machine_state(self) -> contract.MachineState:
        return contract.MachineState.decode(self.state)

    def clone_config(self) -> MachineConfig:
        """The config of a machine made from this template."""
        c = self.config
        return MachineConfig(c.arch, c.mem_size, c.vcpus, c.image, c.cmdline,
                             backing=self.backing())


def _hasher(config: MachineConfig, state: bytes) -> blake3.blake3:
    h = blake3.blake3(derive_key_context=CONTEXT, max_threads=blake3.blake3.AUTO)
    h.update(msgpack.packb({"config": config.to_dict(), "state": state}, use_bin_type=True))
    return h


def _nonzero_runs(pages: np.ndarray, candidates: np.ndarray) -> list[tuple[int, int]]:
    """Runs of non-zero pages among `candidates`, in page order."""
    out: list[tuple[int, int]] = []
    for start, count in runs(candidates):
        for a in range(start, start + count, CHUNK_PAGES):
            b = min(start + count, a + CHUNK_PAGES)
            out += [(a + f, n) for f, n in runs(nonzero_in(pages[a:b]))]
    return _merge(out)


def _merge(rs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for first, count in rs:
        if merged and merged[-1][0] + merged[-1][1] == first:
            merged[-1] = (merged[-1][0], merged[-1][1] + count)
        else:
            merged.append((first, count))
    return merged


def _hash_runs(h: blake3.blake3, pages: np.ndarray, rs: list[tuple[int, int]]) -> None:
    for first, count in rs:
        h.update(_RUN.pack(first, count))
        h.update(pages[first:first + count].reshape(-1).data)


def save(machine: contract.Machine, path: str, parent: str | None = None) -> Template:
    """Write `machine` (paused) as a new template directory `path`; returns it."""
    if machine.running:
        raise MachineError("a template is taken from a paused machine")
    state = machine.save_state().encode()
    cfg = machine.config
    cfg = MachineConfig(cfg.arch, cfg.mem_size, cfg.vcpus, cfg.image, cfg.cmdline)
    pages = np.frombuffer(machine.memory.view(), dtype=np.uint8).reshape(-1, PAGE_SIZE)
    rs = _nonzero_runs(pages, populated(machine.memory))
    h = _hasher(cfg, state)
    _hash_runs(h, pages, rs)
    content_id = h.hexdigest()
    p = Path(path)
    p.mkdir(mode=0o700)
    fd = os.open(p / MEMORY, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
    try:
        os.ftruncate(fd, cfg.mem_size)
        for first, count in rs:
            data = pages[first:first + count].reshape(-1).data
            off = 0
            while off < len(data):
                off += os.pwrite(fd, data[off:], first * PAGE_SIZE + off)
        os.fsync(fd)
    finally:
        os.close(fd)
    npages = sum(n for _, n in rs)
    t = Template(p, content_id, cfg, state, dict(machine.probe.state()), parent, npages)
    write_meta(t)
    return t


def meta(t: Template) -> dict[str, Any]:
    """The template's metadata map (what `template.meta` holds)."""
    return {"format": FORMAT, "content_id": t.content_id, "config": t.config.to_dict(),
            "state": t.state, "probe": t.probe, "parent": t.parent, "data_pages": t.data_pages}


def write_meta(t: Template) -> None:
    (t.path / META).write_bytes(msgpack.packb(meta(t), use_bin_type=True))
    os.chmod(t.path / META, 0o400)


def from_meta(path: Path, d: Any) -> Template:
    """A Template from a metadata map; TemplateError when it is not a valid one."""
    try:
        if d.get("format") != FORMAT:
            raise TemplateError(f"template {path} has format {d.get('format')}, this livemig "
                                f"reads format {FORMAT}")
        cid = str(d["content_id"])
        if len(cid) != 64 or any(c not in "0123456789abcdef" for c in cid):
            raise TemplateError(f"template {path}: malformed content id")
        return Template(path, cid, MachineConfig.from_dict(d["config"]), bytes(d["state"]),
                        dict(d.get("probe") or {}), d.get("parent"), int(d["data_pages"]))
    except TemplateError:
        raise
    except (contract.StateError, AttributeError, KeyError, ValueError, TypeError) as e:
        raise TemplateError(f"template {path} is damaged: {META} is unreadable ({e})") from e


def load(path: str | Path) -> Template:
    """Read a template's metadata (its memory is checked by `verify`); TemplateError."""
    p = Path(path)
    if not (p / META).is_file() or not (p / MEMORY).is_file():
        raise TemplateError(f"{p} is not a template (it needs {META} and {MEMORY})")
    raw = (p / META).read_bytes()
    if len(raw) > MAX_META:
        raise TemplateError(f"template {p}: {META} is too large")
    try:
        d = msgpack.unpackb(raw, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise TemplateError(f"template {p} is damaged: {META} is unreadable ({e})") from e
    t = from_meta(p, d)
    if os.stat(t.memory_path).st_size != t.config.mem_size:
        raise TemplateError(f"template {p} is damaged: its memory is not "
                            f"{t.config.mem_size} bytes")
    return t


_verified: dict[tuple[int, ...], str] = {}  # file identities already hashed in this process


def _identity(t: Template) -> tuple[int, ...]:
    out: list[int] = []
    for f in (t.memory_path, t.path / META):
        st = os.stat(f)
        out += [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return tuple(out)


@contextmanager
def memory_pages(t: Template) -> Iterator[tuple[np.ndarray, list[tuple[int, int]]]]:
    """The template's memory mapped read-only as pages, with its runs of non-zero pages."""
    size = t.config.mem_size
    with open(t.memory_path, "rb") as f:
        candidates = np.zeros(size // PAGE_SIZE, dtype=bool)
        for first, count in data_pages(f.fileno(), size):
            candidates[first:first + count] = True
        m = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
        pages = np.frombuffer(m, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        try:
            yield pages, _nonzero_runs(pages, candidates)
        finally:
            del pages
            try:
                m.close()
            except BufferError:
                pass  # the caller still holds a view: the mapping goes with it


def digest(t: Template) -> str:
    """The content id computed from the template's files."""
    h = _hasher(t.config, t.state)
    with memory_pages(t) as (pages, rs):
        _hash_runs(h, pages, rs)
    return h.hexdigest()


def verify(t: Template) -> None:
    """Raise TemplateError unless the files hash to the template's content id (a file
    identity already checked in this process is not hashed again)."""
    ident = _identity(t)
    if _verified.get(ident) == t.content_id:
        return
    if digest(t) != t.content_id:
        raise TemplateError(f"template {t.path} was tampered with: its content does not match "
                            f"its content id {t.content_id[:16]}")
    _verified[ident] = t.content_id


def of_machine(machine: contract.Machine) -> Template | None:
    """The template a clone was made from (its RAM maps the template's memory), else None."""
    b = machine.config.backing
    if b.kind is not BackingKind.TEMPLATE:
        return None
    return load(Path(b.path).parent)


def each(directory: str | Path | None) -> Iterator[Template]:
    """The readable templates in `directory` (each a subdirectory); others are skipped."""
    if directory is None or not Path(directory).is_dir():
        return
    for sub in sorted(Path(directory).iterdir()):
        try:
            if sub.is_dir():
                yield load(sub)
        except (TemplateError, OSError):
            continue


def ids(directory: str | Path | None) -> list[str]:
    """The content ids of the templates in `directory` (as their metadata says)."""
    return [t.content_id for t in each(directory)]


def find(directory: str | Path | None, content_id: str) -> Template | None:
    """The template with `content_id` in `directory`, or None; its content is not checked
    here (see `verify`)."""
    return next((t for t in each(directory) if t.content_id == content_id), None)
