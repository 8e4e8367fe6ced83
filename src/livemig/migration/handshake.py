"""The hello of every connection: version and feature negotiation, then the key proofs.

    source                                destination
    HELLO  (offer, nonce_s)      ───▶
                                 ◀───     WELCOME (choice, nonce_d, session id)
                                 ◀───     AUTH    HMAC(key, "dst" | HELLO | WELCOME)   [psk]
    AUTH   HMAC(key, "src" | HELLO | WELCOME)  ───▶                                    [psk]

Each side proves the key over both fresh nonces, so a recorded hello cannot be replayed, and
the source checks the destination's proof before it sends anything of the machine. A side
that needs a proof the other cannot give refuses with one line naming what is missing.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from livemig.migration import hello as hello_mod
from livemig.migration.channels import Channel
from livemig.migration.errors import AuthError, ProtocolError, RemoteError, VersionError
from livemig.migration.security import Security
from livemig.migration.wire import Record, RecordType

NONCE_SIZE = 32
SESSION_ID_SIZE = 16
AUTH_PSK = "psk"


def _mac(key: bytes, who: bytes, hello: bytes, welcome: bytes) -> bytes:
    return hmac.new(key, b"livemig-auth-" + who + b"\0" + hello + welcome, hashlib.sha256).digest()


def _expect(chan: Channel, rtype: RecordType, deadline: float | None, peer: str) -> Record:
    rec = chan.read(deadline)
    if rec.type is RecordType.ERROR:
        raise RemoteError(f"{peer}: {rec.text()}")
    if rec.type is RecordType.ABORT:
        raise AuthError(f"{peer} gave up in the hello: {rec.text()}")
    if rec.type is not rtype:
        raise ProtocolError(f"{rec.type.name} record not allowed in the hello ({rtype.name} due)")
    return rec


def client(chan: Channel, offer: hello_mod.Hello, sec: Security,
           deadline: float | None) -> hello_mod.Hello:
    """Source side: offer, check the choice and the destination's proof, prove ours."""
    offer.nonce = os.urandom(NONCE_SIZE)
    offer.auth = [AUTH_PSK] if sec.key else []
    hello_bytes = offer.encode()
    chan.send(RecordType.HELLO, hello_bytes)
    rec = _expect(chan, RecordType.WELCOME, deadline, "destination")
    welcome_bytes = bytes(rec.payload)
    welcome = hello_mod.Hello.decode(welcome_bytes)
    hello_mod.check_welcome(welcome, offer)
    if sec.key is None:
        if AUTH_PSK in welcome.auth:
            raise AuthError("the destination requires a pre-shared key: give --key-file")
        return welcome
    if AUTH_PSK not in welcome.auth:
        _give_up(chan, "this source requires the pre-shared key")
        raise AuthError("the destination has no pre-shared key (is it running with --key-file?)")
    proof = _expect(chan, RecordType.AUTH, deadline, "destination")
    if not hmac.compare_digest(bytes(proof.payload), _mac(sec.key, b"dst", hello_bytes,
                                                          welcome_bytes)):
        _give_up(chan, "the destination's key proof did not verify")
        raise AuthError("the destination could not prove the pre-shared key (wrong key?)")
    chan.send(RecordType.AUTH, _mac(sec.key, b"src", hello_bytes, welcome_bytes))
    return welcome


def server(chan: Channel, mine: hello_mod.Hello, sec: Security,
           deadline: float | None) -> tuple[hello_mod.Hello, hello_mod.Hello]:
    """Destination side: read the offer, answer, prove the key and check the source's proof.

    Returns (offer, choice); the choice's `session` is the session id (new for a main
    connection, the one named for an extra connection)."""
    rec = chan.read(deadline)
    if rec.type is not RecordType.HELLO:
        raise ProtocolError(f"{rec.type.name} record not allowed in state await-hello")
    hello_bytes = bytes(rec.payload)
    offer = hello_mod.Hello.decode(hello_bytes)
    try:
        chosen = hello_mod.choose(offer, mine)
    except VersionError:
        chan.send(RecordType.WELCOME, mine.encode())  # our range, so the source can say why
        raise
    if sec.key is not None and AUTH_PSK not in offer.auth:
        chan.send(RecordType.ERROR, b"this destination requires a pre-shared key (--key-file)")
        raise AuthError("refused a peer that has no pre-shared key")
    chosen.nonce = os.urandom(NONCE_SIZE)
    chosen.auth = [AUTH_PSK] if sec.key else []
    if chosen.session is None:
        chosen.session = os.urandom(SESSION_ID_SIZE)
    welcome_bytes = chosen.encode()
    chan.send(RecordType.WELCOME, welcome_bytes)
    if sec.key is None:
        return offer, chosen
    chan.send(RecordType.AUTH, _mac(sec.key, b"dst", hello_bytes, welcome_bytes))
    proof = _expect(chan, RecordType.AUTH, deadline, "source")
    if not hmac.compare_digest(bytes(proof.payload), _mac(sec.key, b"src", hello_bytes,
                                                          welcome_bytes)):
        chan.send(RecordType.ERROR, b"authentication failed: wrong pre-shared key")
        raise AuthError("refused a peer whose key proof did not verify (wrong key or replay)")
    return offer, chosen


def _give_up(chan: Channel, reason: str) -> None:
    """Tell the destination why we stop, so that it can say so too (best effort)."""
    try:
        chan.send(RecordType.ABORT, reason.encode())
    except Exception:
        pass
