"""Memory backing at the destination: how RAM is made for an incoming machine, from the
CONFIG record's "memory" field (absent: a fresh, zeroed memfd).

    {"kind": "handover", "fds": n}   the source's RAM memfds came with CONFIG (SCM_RIGHTS, a
                                     same-host handover): the machine adopts them
"""

from __future__ import annotations

import os

from livemig.contract import BackingKind, MemoryBacking
from livemig.migration import hello
from livemig.migration.errors import ProtocolError
from livemig.migration.session import Session
from livemig.migration.strategies.handover import MEMORY_HANDOVER

MAX_RAM_FDS = 4


def incoming(memory: object, sess: Session) -> MemoryBacking:
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
