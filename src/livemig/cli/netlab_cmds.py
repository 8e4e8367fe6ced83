"""`livemig netlab up|down`: the namespaces of a network lab (livemig.bench.netlab)."""

from __future__ import annotations

import click

from livemig.bench import netlab
from livemig.bench.netns import NetworkError
from livemig.cli.options import BadInput


@click.group("netlab")
def netlab_cmd() -> None:
    """Network namespaces for a source host, a destination host and a client, joined by a
    bridge: `up` builds them and prints their names and addresses (JSON), `down` removes them."""


@netlab_cmd.command("up")
@click.option("--name", default="lmlab", show_default=True, help="namespace prefix (1-8 "
              "letters or digits)")
@click.option("--rate", default=None, help="shape every host's link with tc tbf, e.g. 1gbit")
def up_cmd(name: str, rate: str | None) -> None:
    """Build the lab (an old one of the same name is removed first)."""
    try:
        lab = netlab.up(name, rate)
    except NetworkError as e:
        raise BadInput(str(e)) from e
    click.echo(netlab.describe(lab))


@netlab_cmd.command("down")
@click.option("--name", default="lmlab", show_default=True, help="namespace prefix")
def down_cmd(name: str) -> None:
    """Remove the lab's namespaces and everything in them."""
    netlab.down(name)


def add_commands(cli: click.Group) -> None:
    cli.add_command(netlab_cmd)
