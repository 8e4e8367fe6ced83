"""Memory backing at the destination: how RAM is made for an incoming machine, from the
CONFIG record's "memory" field (absent: a fresh, zeroed memfd).

    {"kind": "handover", "fds": n}   the source's RAM memfds came with CONFIG (SCM_RIGHTS, a
                                     same-host handover): the machine adopts them
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
from livemig.migration.strategies.handover import MEMORY_HANDOVER
from livemig.migration.strategies.tlm import MEMORY_TEMPLATE

MAX_RAM_FDS = 4


def incoming(memory: object, sess: Session, templates_dir: str | None = None) -> MemoryBacking:
    """The backing a CONFIG's "memory" field asks for; ProtocolError when it cannot be had.
    Descriptors that came with CONFIG and are not used are closed."""
    fds = sess.main.take_fds()
    try:
        if memory is None:
            if fds:
                raise ProtocolError("file descriptors came with a CONFIG that asks for none")
            return MemoryBacking()
        if not isinstance(memory, dict) or not isinstance(memory.get("kind"), str):
            raise ProtocolError("CONFIG record: memory is not a map with a kind")
        if memory["kind"] == MEMORY_HANDOVER:
            return _adopt(memory, fds, sess)
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
