"""The `livemig` group imports the bench and demo commands only when they are asked for."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from conftest import ROOT, run_cli

from livemig.cli.lazygroup import LazyGroup

HEAVY = ("livemig.cli.bench_cmds", "livemig.cli.demo", "rich", "qemu", "unicorn", "matplotlib")


def test_a_machine_or_ctl_process_does_not_import_the_bench_stack() -> None:
    code = ("import sys; from livemig.cli.main import cli; "
            f"print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r} "
            f"or m in {HEAVY!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("command", ["bench", "demo"])
def test_lazy_commands_are_listed_and_run(command: str) -> None:
    listing = run_cli("--help")
    assert listing.returncode == 0 and f"  {command} " in listing.stdout, listing.stdout
    res = run_cli(command, "--help")
    assert res.returncode == 0 and "Usage: livemig " + command in res.stdout, res.stderr


def test_a_lazy_entry_that_is_not_a_command_is_refused() -> None:
    group = LazyGroup(lazy={"bad": "livemig.cli.lazygroup:LazyGroup"})
    with pytest.raises(TypeError, match="not a click command"):
        group.get_command(click.Context(group), "bad")
