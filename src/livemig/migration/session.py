"""A session: one migration's negotiated version, features and codecs, its channels, stats.

The source opens a session by dialing the main connection and running the hello on it; a
channel that cannot be read and written at once (TLS) gets a second connection, role
RETURN, for the destination's answers. A file session is one-way: there is no peer to answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from livemig.migration import handshake
from livemig.migration import hello as hello_mod
from livemig.migration.channels import Channel, Role
from livemig.migration.codecs import SUPPORTED, CodecSet, offered
from livemig.migration.errors import ProtocolError
from livemig.migration.options import MigrationOptions, Mode
from livemig.migration.security import Security
from livemig.migration.stats import MigrationStats
from livemig.migration.wire import RecordType

Redial = Callable[[Role], Channel]


@dataclass
class Session:
    """One migration as both sides see it once the hello is done."""

    id: bytes
    version: int
    features: list[str]
    codecs: CodecSet
    main: Channel
    back: Channel | None  # where the destination answers; None for a one-way (file) session
    security: str = "none"
    stats: MigrationStats = field(default_factory=MigrationStats)
    pages: list[Channel] = field(default_factory=list)  # page streams (`--streams N`)
    urgent: Channel | None = None  # post-copy: pages that faults asked for
    templates: list[str] = field(default_factory=list)  # ids the destination holds (WELCOME)

    def channels(self) -> list[Channel]:
        out: list[Channel] = []
        for c in (self.main, self.back, self.urgent, *self.pages):
            if c is not None and all(c is not o for o in out):
                out.append(c)
        return out

    def record_channels(self) -> None:
        """Copy each channel's figures into the stats."""
        self.stats.channels = {c.label: c.stats() for c in self.channels()}

    def close(self) -> None:
        for c in self.channels():
            c.close()


def offer(opts: MigrationOptions) -> hello_mod.Hello:
    """What a source proposes: the codecs its options ask for, the features it wants."""
    o = hello_mod.Hello(encodings=offered(opts))
    if not opts.verify_memory:
        o.features.remove(hello_mod.FEATURE_VERIFY)
    if opts.mode is not Mode.HANDOVER:
        o.features.remove(hello_mod.FEATURE_HANDOVER)
    return o


def open_source(main: Channel, sec: Security, proposal: hello_mod.Hello,
                redial: Redial | None, deadline: float | None,
                opts: MigrationOptions | None = None) -> Session:
    """Run the hello on `main` (and on a RETURN connection when `main` is not duplex)."""
    welcome = handshake.client(main, proposal, sec, deadline)
    codecs = CodecSet(welcome.encodings, opts)
    if codecs.missing():
        raise ProtocolError(f"destination does not accept {', '.join(codecs.missing())} pages")
    sid = welcome.session or b""
    sess = Session(sid, welcome.min_version, welcome.features, codecs, main, main,
                   sec.describe())
    sess.templates = [t for t in welcome.templates if t in proposal.templates]
    if not main.duplex:
        if redial is None:
            raise ProtocolError(f"a {main.kind} session needs a return connection")
        sess.back = join(sess, proposal, redial, Role.RETURN, Role.RETURN.value, sec, deadline)
    return sess


def join(sess: Session, proposal: hello_mod.Hello, redial: Redial, role: Role, label: str,
         sec: Security, deadline: float | None) -> Channel:
    """Open one more connection of `sess` (its hello names the session and `label`)."""
    chan = redial(role)
    chan.label = label
    hello = hello_mod.Hello(proposal.min_version, proposal.max_version, list(sess.features),
                            sess.codecs.names, role=label, session=sess.id)
    try:
        handshake.client(chan, hello, sec, deadline)
    except BaseException:
        chan.close()
        raise
    return chan


def open_file_writer(main: Channel, proposal: hello_mod.Hello,
                     opts: MigrationOptions | None = None) -> Session:
    """A one-way session into a snapshot file: the HELLO says what the file holds."""
    proposal.min_version = proposal.max_version
    proposal.features = []
    main.send(RecordType.HELLO, proposal.encode())
    return Session(b"", proposal.max_version, [], CodecSet(proposal.encodings, opts), main,
                   None)


def open_file_reader(main: Channel) -> Session:
    """A one-way session read from a snapshot file: its HELLO must be one we understand."""
    rec = main.read()
    if rec.type is not RecordType.HELLO:
        raise ProtocolError("not a livemig snapshot (it does not start with a HELLO record)")
    h = hello_mod.Hello.decode(rec.payload)
    hello_mod.choose(h, hello_mod.Hello(encodings=list(SUPPORTED)))
    codecs = CodecSet(h.encodings)
    unknown = set(h.encodings) - set(codecs.names)
    if unknown:
        raise ProtocolError(f"snapshot uses page codecs this livemig lacks: {sorted(unknown)}")
    return Session(b"", h.max_version, [], codecs, main, None)



