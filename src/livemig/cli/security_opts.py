"""`--key-file`, `--tls-dir` and `--insecure`: how `listen` and `migrate` authenticate.

Safe by default: without a key or TLS the commands refuse to run unless `--insecure` says
the user means it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from livemig.migration.credentials import (
    CredentialError,
    client_context,
    load_key,
    load_tls_dir,
    server_context,
)
from livemig.migration.security import Security

F = TypeVar("F", bound=Callable[..., Any])


def security_options(fn: F) -> F:
    """Add the three options to a click command."""
    fn = click.option("--insecure", is_flag=True,
                      help="allow a migration without a key or TLS (trusted networks only)")(fn)
    fn = click.option("--tls-dir", default=None,
                      help="mutual TLS: a directory with ca.pem, cert.pem, key.pem")(fn)
    fn = click.option("--key-file", default=None,
                      help="pre-shared key file (livemig keygen FILE); both sides need it")(fn)
    return fn


def build_security(key_file: str | None, tls_dir: str | None, insecure: bool) -> Security:
    """Load the credentials named; CredentialError (one line) when they are unusable or
    when none is given without --insecure."""
    if not key_file and not tls_dir:
        if insecure:
            return Security.insecure()
        raise CredentialError("refusing to migrate without authentication: give --key-file "
                              "or --tls-dir (or --insecure, on a trusted network only)")
    key = load_key(key_file) if key_file else None
    if not tls_dir:
        return Security(key=key)
    files = load_tls_dir(tls_dir)
    return Security(key=key, tls_client=client_context(files), tls_server=server_context(files))


def security_request(key_file: str | None, tls_dir: str | None,
                     insecure: bool) -> dict[str, Any]:
    """The fields a `migrate` control request carries (paths, made absolute: the source
    machine process loads the files itself)."""
    build_security(key_file, tls_dir, insecure)  # refuse bad credentials here, with exit 2
    return {"key_file": key_file and os.path.abspath(key_file),
            "tls_dir": tls_dir and os.path.abspath(tls_dir), "insecure": insecure}


def security_from_request(req: dict[str, Any]) -> Security:
    """Security from a `migrate` control request's fields."""
    key_file, tls_dir = req.get("key_file"), req.get("tls_dir")
    if not isinstance(key_file, str | None) or not isinstance(tls_dir, str | None):
        raise CredentialError("key_file and tls_dir must be paths")
    return build_security(key_file, tls_dir, bool(req.get("insecure", False)))
