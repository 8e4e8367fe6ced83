"""`livemig keygen` and `livemig tls-gen`: make the credentials of authenticated migrations.

A pre-shared key file is copied to both hosts; a TLS directory is made per host, all of them
from one CA (`--ca-dir`), so that each accepts the others.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from livemig.migration.credentials import (
    CA_FILE,
    KEY_SIZE,
    CredentialError,
    make_tls_dir,
    write_key,
)


@click.command("keygen")
@click.argument("file")
def keygen_cmd(file: str) -> None:
    """Write a new random pre-shared key to FILE (mode 0600); never overwrites."""
    try:
        write_key(file)
    except CredentialError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote a {KEY_SIZE * 8}-bit key to {os.path.abspath(file)} (mode 0600); "
               f"give the peer host the same file, over a secure channel")


@click.command("tls-gen")
@click.argument("directory", metavar="DIR")
@click.option("--ca-dir", default=None, metavar="DIR",
              help="the CA to sign with, made there if absent; the same for every peer  "
                   "[default: DIR itself]")
@click.option("--name", default="livemig", show_default=True,
              help="host name for the certificate (localhost and 127.0.0.1 are always in it)")
def tls_gen_cmd(directory: str, ca_dir: str | None, name: str) -> None:
    """Make DIR with ca.pem, cert.pem and key.pem for mutual TLS between migration hosts."""
    ca_root = Path(ca_dir if ca_dir is not None else directory)
    new_ca = not (ca_root / CA_FILE).exists()
    try:
        make_tls_dir(directory, ca_dir, name)
    except CredentialError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{'made a new' if new_ca else 'used the'} CA in {ca_root.resolve()}")
    click.echo(f"wrote ca.pem, cert.pem and key.pem (for {name}) to "
               f"{Path(directory).resolve()}")
    if ca_dir is None:
        click.echo("the CA's private key (ca-key.pem) is in that directory too: for a demo "
                   "only; use --ca-dir to keep it elsewhere")


def add_commands(cli: click.Group) -> None:
    """Add `keygen` and `tls-gen` to the `livemig` command group."""
    cli.add_command(keygen_cmd)
    cli.add_command(tls_gen_cmd)
