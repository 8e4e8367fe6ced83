"""Shipping a template to a destination that lacks it (TLM with --ship-template).

Before CONFIG, the source opens one more connection of the session, role `template`
(authenticated like any other), and sends on it:

    CONFIG     msgpack {"template": the template's metadata map (templates.meta)}
    PAGES ...  the template's non-zero pages (codecs zero and raw)
    ROUND_END  msgpack {"round": 0, "pages": count}

The destination writes them into a new template directory under its templates directory
(`listen --templates DIR`), checks that the files hash to the content id, moves it into
place and answers ROUND_ACK; anything else is ERROR. The template then serves this migration
and every later clone of it.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from livemig.contract import PAGE_SIZE
from livemig.migration import pages, records, session, templates
from livemig.migration.channels import Channel, Role
from livemig.migration.codecs import CodecSet
from livemig.migration.errors import MigrationError, ProtocolError, RemoteError
from livemig.migration.wire import RecordType

if TYPE_CHECKING:
    from livemig.migration.source import Source

CODECS = ("zero", "raw")
ANSWER_TIMEOUT = 120.0  # seconds the destination may take to write and check a template
RECORD_TIMEOUT = 60.0


def ship(src: Source, t: templates.Template) -> None:
    """Send template `t` on a new `template` connection; returns once the destination holds
    it (MigrationError otherwise)."""
    if src.redial is None or src.session is None:
        raise MigrationError("shipping a template needs a destination address to dial")
    deadline = time.monotonic() + RECORD_TIMEOUT
    chan = session.join(src.session, session.offer(src.opts), src.redial, Role.TEMPLATE,
                        Role.TEMPLATE.value, src.security, deadline)
    try:
        n = chan.send(RecordType.CONFIG, records.pack({"template": templates.meta(t)}))
        codecs = CodecSet(CODECS)
        with templates.memory_pages(t) as (mem, rs):
            idx = np.concatenate([np.arange(f, f + c) for f, c in rs]) if rs else np.zeros(0)
            enc = pages.BatchEncoder(mem, codecs)
            for i in range(0, len(idx), pages.MAX_BATCH):
                src.check()
                b = enc.encode(idx[i:i + pages.MAX_BATCH].astype(np.int64), frozen=True)
                n += chan.send(RecordType.PAGES, b.meta, *b.data)
                enc.release(b)
            del mem
        n += chan.send(RecordType.ROUND_END, records.pack({"round": 0, "pages": len(idx)}))
        src.stats.bytes_sent += n
        src.stats.event(f"tlm-shipped-bytes:{n}")
        rec = chan.read(time.monotonic() + ANSWER_TIMEOUT)
        if rec.type is RecordType.ERROR:
            raise RemoteError(f"the destination refused the template: {rec.text()}")
        if rec.type is not RecordType.ROUND_ACK:
            raise ProtocolError(f"{rec.type.name} record in answer to a shipped template")
    finally:
        chan.close()


def receive(chan: Channel, directory: str | None) -> templates.Template:
    """Take a template shipped on `chan` into `directory`; the caller answers the source."""
    if directory is None:
        raise MigrationError("this destination keeps no templates (listen --templates DIR)")
    rec = chan.read(time.monotonic() + RECORD_TIMEOUT)
    if rec.type is not RecordType.CONFIG:
        raise ProtocolError(f"{rec.type.name} record where a template's CONFIG was due")
    d = records.unpack(rec.payload, "CONFIG", ("template",))
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=directory))
    try:
        t = templates.from_meta(staging, d["template"])
        if (held := templates.find(directory, t.content_id)) is not None:
            _drain(chan)
            return held
        if shutil.disk_usage(directory).free < t.config.mem_size:
            raise MigrationError(f"no room for a template of {t.config.mem_size >> 20} MiB in "
                                 f"{directory}")
        _write_memory(chan, t)
        templates.write_meta(t)
        templates.verify(templates.load(staging))
        final = Path(directory) / t.content_id[:32]
        os.rename(staging, final)
        return templates.load(final)
    except templates.TemplateError as e:
        raise MigrationError(str(e)) from e
    except OSError as e:
        raise MigrationError(f"cannot store the template in {directory}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_memory(chan: Channel, t: templates.Template) -> None:
    size = t.config.mem_size
    fd = os.open(t.memory_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            ram = np.frombuffer(m, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            try:
                _receive_pages(chan, ram)
            finally:
                del ram
            m.flush()
        os.fchmod(fd, 0o400)
    finally:
        os.close(fd)


def _receive_pages(chan: Channel, ram: np.ndarray) -> None:
    codecs = CodecSet(CODECS)
    placer = pages.RamPlacer(ram)
    while True:
        rec = chan.read(time.monotonic() + RECORD_TIMEOUT)
        if rec.type is RecordType.ROUND_END:
            return
        if rec.type is not RecordType.PAGES:
            raise ProtocolError(f"{rec.type.name} record in a shipped template")
        pages.apply(pages.decode(rec.payload, len(ram), codecs), codecs, placer)


def _drain(chan: Channel) -> None:
    """A template already held: read (and drop) what is shipped, up to its end."""
    while chan.read(time.monotonic() + RECORD_TIMEOUT).type is not RecordType.ROUND_END:
        pass
