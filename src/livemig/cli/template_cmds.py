"""Templates and clones: `livemig template save SOCK PATH` (the control command
`template-save`, the guest runs on afterwards) and `livemig run --template PATH`."""

from __future__ import annotations

import os
import time
from typing import Any

import click

from livemig.cli.options import BadInput
from livemig.cli.process import host_machine
from livemig.cli.runner import MachineHost, build_machine, open_console, prepare_control_path
from livemig.contract import MachineError
from livemig.control import ControlError, request
from livemig.migration import templates


def register_template_controls(host: MachineHost) -> None:
    """Add `template-save` to a machine's control socket."""

    def save(req: dict[str, Any]) -> dict[str, Any]:
        path = req.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise ControlError("template-save needs an absolute 'path'")
        if os.path.lexists(path):
            raise ControlError(f"cannot save a template to {path}: it exists")
        with host.lock:
            m = host.machine
            was_running = m.running
            t0 = time.monotonic()
            m.pause()
            try:
                parent = templates.of_machine(m)
                t = templates.save(m, path, parent.content_id if parent else None)
            except OSError as e:
                raise ControlError(f"cannot save a template to {path}: {e.strerror or e}") from e
            finally:
                paused_ms = (time.monotonic() - t0) * 1000
                if was_running:
                    m.resume()  # seamless templating: the guest runs on
        return {"path": path, "content_id": t.content_id, "data_pages": t.data_pages,
                "parent": t.parent, "paused_ms": round(paused_ms, 1)}

    host.control.register("template-save", save)


@click.group("template")
def template_group() -> None:
    """Templates: a machine's memory and state on disk, for clones to share copy-on-write."""


@template_group.command("save")
@click.argument("socket_path", metavar="SOCKET")
@click.argument("path")
def template_save(socket_path: str, path: str) -> None:
    """Save the machine behind control SOCKET as a new template directory PATH; the guest
    runs on."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        raise BadInput(f"cannot save a template to {path}: it exists")
    reply = request(socket_path, "template-save", timeout=600, path=path)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "template-save failed"))
    click.echo(f"template {reply['content_id']} saved to {reply['path']} "
               f"({reply['data_pages']} data pages, guest paused {reply['paused_ms']} ms)")


def run_clone(path: str, vcpus: int | None, console: str, control: str | None) -> None:
    """`livemig run --template PATH`: a clone whose RAM maps the template copy-on-write."""
    try:
        t = templates.load(path)
        templates.verify(t)
    except OSError as e:
        raise BadInput(f"template {path}: {e.strerror or e}") from e
    if vcpus is not None and vcpus != t.config.vcpus:
        raise BadInput(f"template {path} holds a machine of {t.config.vcpus} vCPU(s), "
                       f"not {vcpus}")
    state = t.machine_state()
    control = prepare_control_path(control)
    sink, close = open_console(console)
    try:
        machine = build_machine(t.clone_config(), sink)
    except MachineError:
        close()
        raise
    host_machine(machine, control, close, lambda m: m.load_state(state))


def add_commands(cli: click.Group) -> None:
    cli.add_command(template_group)
