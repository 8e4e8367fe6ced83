"""Malformed machine states and documented limits (issue 8, defects 11 and 12).

A STATE the destination cannot use must be refused with a StateError that says what is
wrong, before anything changes, never a KeyError / TypeError / AttributeError that would end
up, by name, in an ERROR record.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, image, needs_kvm

from livemig.contract import Arch, MachineConfig, MachineState, StateError
from livemig.migration.pages import MAX_BATCH


@pytest.fixture(scope="module")
def saved() -> Iterator[tuple[MachineState, Any]]:
    from livemig.machine import KvmMachine

    cfg = MachineConfig(Arch.X86_64, 16 << 20, 2, image("idle"), "")
    src = KvmMachine(cfg, None)
    src.start()
    src.pause()
    state = src.save_state()
    src.close()
    fresh = KvmMachine(cfg, None)
    yield state, fresh
    fresh.close()


def mutate(state: MachineState, where: list[Any], value: Any) -> MachineState:
    """A copy of `state` with the field at path `where` replaced by `value` (None: removed)."""
    d: dict[str, Any] = {"vcpus": copy.deepcopy(state.vcpus), "vm": copy.deepcopy(state.vm),
                         "devices": copy.deepcopy(state.devices)}
    node: Any = d
    for k in where[:-1]:
        node = node[k]
    if value is None:
        del node[where[-1]]
    else:
        node[where[-1]] = value
    return MachineState(state.arch, state.cpu_model, d["vcpus"], d["vm"], d["devices"])


CASES = [
    (["devices", "uart", "mcr"], None, "'mcr'"),
    (["devices", "uart", "lcr"], "x", "'lcr'"),
    (["devices", "uart"], [1, 2], "UART"),
    (["vcpus", 0], "not a map", "not a map"),
    (["vcpus", 0, "msrs"], [[1, 2, 3]], "MSR"),
    (["vcpus", 0, "msrs"], [["a", 1]], "MSR"),
    (["vcpus", 1, "regs"], None, "'regs'"),
    (["vcpus", 1, "mp_state"], "run", "mp_state"),
    (["vm", "pit2"], 5, "'pit2'"),
]


@needs_kvm
@pytest.mark.parametrize(("where", "value", "says"), CASES)
def test_malformed_state_is_named(saved: tuple[MachineState, Any], where: list[Any],
                                  value: Any, says: str) -> None:
    state, fresh = saved
    with pytest.raises(StateError, match=re.escape(says)):
        fresh.load_state(mutate(state, where, value))


@needs_kvm
def test_random_damage_only_raises_state_errors(saved: tuple[MachineState, Any]) -> None:
    state, fresh = saved
    rng = random.Random(11)
    junk: list[Any] = [None, 0, -1, "x", b"", [], {}, [[]], 1 << 70, 3.5]
    paths = [["devices", "uart", k] for k in state.devices["uart"]]
    paths += [["vcpus", i, k] for i in range(len(state.vcpus)) for k in state.vcpus[i]]
    paths += [["vm", k] for k in state.vm]
    for _ in range(200):
        where = rng.choice(paths)
        value = rng.choice(junk)
        if value is None and where[0] == "devices" and where[-1] == "pending":
            continue  # optional: a state without a partial console line is whole
        try:
            fresh.load_state(mutate(state, where, value))
        except StateError:
            continue


def test_protocol_doc_states_the_batch_limit_the_code_enforces() -> None:
    doc = (Path(ROOT) / "docs" / "protocol.md").read_text()
    m = re.search(r"n, pages in the batch \(1\.\.(\d+)\)", doc)
    assert m and int(m.group(1)) == MAX_BATCH, "docs/protocol.md and pages.MAX_BATCH disagree"
