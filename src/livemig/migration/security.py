"""What an endpoint requires of its peer: a pre-shared key, mutual TLS, both, or nothing.

The key proves itself by HMAC challenge-response in the hello (handshake.py); TLS proves a
certificate signed by the configured CA and encrypts the stream. `insecure()` is only for
`--insecure`: the CLI refuses to run without credentials otherwise.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class Security:
    """Credentials of one endpoint; contexts are built by `credentials.py`."""

    key: bytes | None = None
    tls_client: ssl.SSLContext | None = None
    tls_server: ssl.SSLContext | None = None

    @classmethod
    def insecure(cls) -> Security:
        return cls()

    @property
    def authenticated(self) -> bool:
        return self.key is not None or self.tls_client is not None or self.tls_server is not None

    def describe(self) -> str:
        """`psk`, `tls`, `psk+tls` or `none`: what the stats and logs say was used."""
        parts = [n for n, on in (("psk", self.key is not None),
                                 ("tls", self.tls_client or self.tls_server)) if on]
        return "+".join(parts) or "none"
