"""Versioned hello and feature negotiation.

HELLO payload (source -> destination), WELCOME payload (destination -> source):

    4 bytes  b"LMIG"
    u16      lowest protocol version the sender speaks (WELCOME: chosen version)
    u16      highest protocol version the sender speaks (WELCOME: chosen version again)
    msgpack  {"features": [str], "encodings": [str], "software": str, "role": str,
              "session": bytes or nil, "nonce": bytes, "auth": [str], "templates": [str]}

"templates" (optional): in HELLO the content ids of the templates the machine was cloned from
(template-aware migration); in WELCOME those of them the destination holds.

The fixed prefix never changes, so two livemig of any version can tell each other apart. The
destination picks the highest common version and answers with the features and page
encodings it accepts among those offered; the source then uses nothing else.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass, field

import msgpack

from livemig.migration.errors import ProtocolError, VersionError

PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1
HELLO_MAGIC = b"LMIG"
_PREFIX = struct.Struct("<4sHH")

# Optional features; a peer that does not list one does not get it.
FEATURE_VERIFY = "verify-memory"  # VERIFY record with keyed BLAKE3 per page
FEATURE_ROUND_ACK = "round-ack"  # destination answers ROUND_END with ROUND_ACK
FEATURE_REPORT = "report"  # destination sends REPORT after RUNNING
FEATURE_STREAMS = "streams"  # PAGES may come on extra connections `pages-N` (--streams)
FEATURE_POSTCOPY = "postcopy"  # post-copy: urgent connection, page requests, recovery
FEATURE_PREPARE = "postcopy-prepare"  # hybrid: PREPARE / PREPARED before the pause
FEATURE_NET = "net-forward"  # frames forwarded after COMMIT on a `net` connection (--soft-net)
FEATURE_HANDOVER = "fd-handover"  # RAM memfds travel with CONFIG (same host, unix socket)
# post-copy: PAGE_REQUEST on the urgent connection, answered there (C loops: faultpath.py)
FEATURE_URGENT_REQUESTS = "urgent-requests"
MAX_TEMPLATES = 16  # template ids a hello may name
KNOWN_FEATURES = (FEATURE_VERIFY, FEATURE_ROUND_ACK, FEATURE_REPORT, FEATURE_STREAMS,
                  FEATURE_POSTCOPY, FEATURE_PREPARE, FEATURE_NET, FEATURE_HANDOVER,
                  FEATURE_URGENT_REQUESTS)


def offered_features() -> list[str]:
    """What this build can do: every known feature, less the C fault path where it was not
    built (a source tree run without `pip install`)."""
    native = importlib.util.find_spec("livemig._faultpath") is not None
    return [f for f in KNOWN_FEATURES if native or f != FEATURE_URGENT_REQUESTS]


@dataclass
class Hello:
    """What one side offers (HELLO) or what the destination chose (WELCOME).

    `role` names what the connection carries (channels.Role), `session` the migration an
    extra connection belongs to (the destination assigns it in the main WELCOME), `nonce` is
    fresh per connection and `auth` lists the proofs the sender will give ("psk").
    """

    min_version: int = MIN_PROTOCOL_VERSION
    max_version: int = PROTOCOL_VERSION
    features: list[str] = field(default_factory=offered_features)
    encodings: list[str] = field(default_factory=list)
    software: str = "livemig"
    role: str = "main"
    session: bytes | None = None
    nonce: bytes = b""
    auth: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        body = {"features": self.features, "encodings": self.encodings, "software": self.software,
                "role": self.role, "session": self.session, "nonce": self.nonce,
                "auth": self.auth}
        if self.templates:
            body["templates"] = self.templates
        return _PREFIX.pack(HELLO_MAGIC, self.min_version, self.max_version) + msgpack.packb(
            body, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Hello:
        """Parse a HELLO or WELCOME payload; ProtocolError if it is not one."""
        if len(data) < _PREFIX.size:
            raise ProtocolError(f"hello too short ({len(data)} bytes)")
        magic, lo, hi = _PREFIX.unpack_from(data)
        if magic != HELLO_MAGIC:
            raise ProtocolError(f"bad hello magic {magic!r}")
        try:
            body = msgpack.unpackb(bytes(data[_PREFIX.size :]), raw=False)
            feats = [str(f) for f in body["features"]]
            encs = [str(e) for e in body["encodings"]]
            soft = str(body.get("software", ""))
            role = str(body.get("role", "main"))
            session = body.get("session")
            nonce = body.get("nonce", b"")
            auth = [str(a) for a in body.get("auth", [])]
            templates = [str(t) for t in body.get("templates", [])][:MAX_TEMPLATES]
        except Exception as e:
            raise ProtocolError(f"malformed hello body: {e}") from e
        if not isinstance(nonce, bytes) or not isinstance(session, bytes | None):
            raise ProtocolError("malformed hello body: nonce and session must be byte strings")
        return cls(lo, hi, feats, encs, soft, role, session, nonce, auth, templates)


def choose(offer: Hello, mine: Hello) -> Hello:
    """Destination side: answer `offer` from what this side supports (`mine`)."""
    lo = max(offer.min_version, mine.min_version)
    hi = min(offer.max_version, mine.max_version)
    if lo > hi:
        raise VersionError(
            f"no common protocol version: peer speaks {offer.min_version}..{offer.max_version},"
            f" this livemig speaks {mine.min_version}..{mine.max_version}"
        )
    feats = [f for f in offer.features if f in mine.features]
    encs = [e for e in offer.encodings if e in mine.encodings]
    held = [t for t in offer.templates if t in mine.templates]
    return Hello(hi, hi, feats, encs, mine.software, offer.role, offer.session,
                 templates=held)


def check_welcome(welcome: Hello, offer: Hello) -> int:
    """Source side: accept the destination's choice or raise; returns the chosen version."""
    v = welcome.min_version
    if welcome.min_version != welcome.max_version or not (
        offer.min_version <= v <= offer.max_version
    ):
        raise VersionError(
            f"destination answered with protocol version {welcome.min_version}"
            f"..{welcome.max_version}, this livemig speaks {offer.min_version}..{offer.max_version}"
        )
    extra = set(welcome.features) - set(offer.features)
    extra |= set(welcome.encodings) - set(offer.encodings)
    if extra:
        raise ProtocolError(f"destination chose things never offered: {sorted(extra)}")
    return v
