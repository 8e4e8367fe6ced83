"""Template-aware migration (TLM, seed 002 chapter 3): a clone whose template the destination
already holds sends only its delta pages.

The hello names the clone's template by content id; the destination's WELCOME says whether
it holds it (`listen --templates DIR`). If it does, CONFIG asks it to map that template
copy-on-write as RAM (it checks the template's content id first, and refuses a tampered one),
and pre-copy's round 1 is the clone's deltas only: the pages no longer backed by the template
file (GuestMemory.template_deltas, read with dirty logging already on, so that a page written
meanwhile goes in round 2). Later rounds, the switch-over and --verify-memory are pre-copy's.

If the destination lacks the template: with --ship-template the source sends it first (the
destination keeps it for later clones), else the migration is a generic pre-copy. Which of
the three happened is an event in the stats ("tlm:deltas", "tlm:shipped", "tlm:generic").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from livemig.migration import templates
from livemig.migration.errors import MigrationError
from livemig.migration.strategies.precopy import PreCopy

if TYPE_CHECKING:
    from livemig.migration.hello import Hello
    from livemig.migration.source import Source

MEMORY_TEMPLATE = "template"  # CONFIG "memory" kind: map the template with this content id


class TemplateAware(PreCopy):
    name = "tlm"

    def __init__(self) -> None:
        super().__init__()
        self.template: templates.Template | None = None
        self.deltas_only = False

    def offer(self, src: Source, proposal: Hello) -> None:
        self.template = templates.of_machine(src.m)
        if self.template is None:
            raise MigrationError("--mode tlm migrates a clone (livemig run --template); this "
                                 "machine was not made from a template")
        proposal.templates = [self.template.content_id]

    def configure(self, src: Source) -> tuple[dict[str, Any], list[int]]:
        assert self.template is not None and src.session is not None
        tid = self.template.content_id
        if tid not in src.session.templates and src.opts.ship_template:
            from livemig.migration.template_ship import ship

            ship(src, self.template)
            src.stats.event("tlm:shipped")
        elif tid not in src.session.templates:
            src.stats.event("tlm:generic")  # the destination lacks the template
            return {}, []
        self.deltas_only = True
        src.stats.event("tlm:deltas")
        return {"memory": {"kind": MEMORY_TEMPLATE, "id": tid}}, []

    def first_round(self, src: Source) -> np.ndarray | None:
        if not self.deltas_only:
            return None
        deltas = src.m.memory.template_deltas()
        if deltas is None:
            raise MigrationError("the clone's RAM no longer maps its template")
        idx = np.flatnonzero(deltas)
        src.stats.event(f"tlm-deltas:{len(idx)}")
        return idx
