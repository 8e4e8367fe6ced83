"""Memory backing at the destination: how RAM is made for an incoming machine, from the
CONFIG record's "memory" field (absent: a fresh, zeroed memfd).

    {"kind": "handover", "fds": n}   the source's RAM memfds came with CONFIG (SCM_RIGHTS, a
                                     same-host handover): the machine adopts them
    {"kind": "handover-template", "fds": 1, "id": hex, "path": str}
                                     a clone's same-host handover: its template's memory file
                                     came with CONFIG; it must be the file at `path` (which
                                     is mapped copy-on-write) and hash to `id`
    {"kind": "template", "id": hex}  map the template with that content id, held in this
                                     destination's templates directory, copy-on-write (TLM);
                                     its content is checked against the id first
"""

from __future__ import annotations

import os

from livemig.contract import BackingKind, MemoryBacking
from livemig.migration import hello, templates
from livemig.migration.errors import MigrationError, ProtocolError
from livemig.migration.session import Session
from livemig.migration.strategies.handover import MEMORY_HANDOVER, MEMORY_HANDOVER_TEMPLATE
from livemig.migration.strategies.tlm import MEMORY_TEMPLATE
from livemig.rampool import RamPool

MAX_RAM_FDS = 4


def incoming(memory: object, sess: Session, templates_dir: str | None = None,
             postcopy: bool = False, pool: RamPool | None = None,
             mem_size: int = 0) -> MemoryBacking:
    """The backing a CONFIG's "memory" field asks for; ProtocolError when it cannot be had.
    Descriptors that came with CONFIG and are not used are closed.

    Fresh RAM is taken from `pool` (RAM allocated ahead: `listen --prealloc`) where it fits,
    except by post-copy: userfaultfd installs its pages into holes, and the pool's RAM has
    none."""
    fds = sess.main.take_fds()
    try:
        if memory is None:
            if fds:
                raise ProtocolError("file descriptors came with a CONFIG that asks for none")
            taken = None if postcopy or pool is None else pool.take(mem_size)
            return taken or MemoryBacking()
        if not isinstance(memory, dict) or not isinstance(memory.get("kind"), str):
            raise ProtocolError("CONFIG record: memory is not a map with a kind")
        if memory["kind"] == MEMORY_HANDOVER:
            return _adopt(memory, fds, sess)
        if memory["kind"] == MEMORY_HANDOVER_TEMPLATE:
            adopted = _adopt(memory, fds, sess).fds
            fds = []  # _handed_template closes them, whatever happens
            return _handed_template(memory, adopted)
        if fds:
            raise ProtocolError("file descriptors came with a CONFIG that asks for none")
        if memory["kind"] == MEMORY_TEMPLATE:
            return _template(memory, templates_dir)
        raise ProtocolError(f"CONFIG record: unknown memory kind {memory['kind']!r}")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _adopt(memory: dict, fds: list[int], sess: Session) -> MemoryBacking:
    if hello.FEATURE_HANDOVER not in sess.features:
        raise ProtocolError("a handover was not negotiated")
    want = memory.get("fds")
    if not isinstance(want, int) or not 1 <= want <= MAX_RAM_FDS:
        raise ProtocolError(f"CONFIG record: a handover has 1..{MAX_RAM_FDS} RAM descriptors")
    if len(fds) != want:
        raise ProtocolError(f"the handover announced {want} RAM descriptor(s), "
                            f"{len(fds)} arrived (a handover needs a unix socket)")
    return MemoryBacking(BackingKind.ADOPTED, tuple(fds))


def _template(memory: dict, templates_dir: str | None) -> MemoryBacking:
    tid = memory.get("id")
    if not isinstance(tid, str) or len(tid) != 64:
        raise ProtocolError("CONFIG record: a template id is 64 hex digits")
    t = templates.find(templates_dir, tid)
    if t is None:
        raise MigrationError(f"this destination does not hold template {tid[:16]}")
    try:
        templates.verify(t)
    except templates.TemplateError as e:
        raise MigrationError(f"refusing {e}") from e
    return t.backing()


def _handed_template(memory: dict, fds: tuple[int, ...]) -> MemoryBacking:
    """The template file a clone's handover sent: checked, then mapped by its path."""
    try:
        path = memory.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise ProtocolError("CONFIG record: a handed-over template needs its absolute path")
        got, there = os.fstat(fds[0]), os.stat(path)
        if (got.st_dev, got.st_ino) != (there.st_dev, there.st_ino):
            raise ProtocolError(f"the template file handed over is not {path}")
        t = templates.load(os.path.dirname(path))
        if t.content_id != memory.get("id"):
            raise MigrationError(f"template {t.path} is not the one the source named")
        templates.verify(t)
    except templates.TemplateError as e:
        raise MigrationError(f"refusing {e}") from e
    except OSError as e:
        raise MigrationError(f"the handed-over template: {e.strerror or e}") from e
    finally:
        for fd in fds:
            os.close(fd)
    return t.backing()
