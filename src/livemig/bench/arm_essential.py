"""Which part of an ARMv8 guest's state is essential to survive a migration (thesis O6, O9).

The thesis (seed 000) asked which registers a hypervisor must move for a guest to survive, and
answered by listing candidates. Here it is answered by experiment: a running guest is migrated
(its RAM copied exactly, its state saved and loaded into a fresh destination machine of the
same configuration) with one group of state left out: that group's values are what a fresh
destination holds (reset values), as if the hypervisor had not sent them. The destination then
runs for a while and the outcome is classified:

- survives: heartbeats go on from the source's count (at least MIN_HEARTBEATS on every vCPU),
  no failure;
- wrong values: the guest runs but reports a failure of its own checks (cpustate: a register
  lost its value) or its heartbeat count does not continue;
- crashes: a vCPU stops (an exception the board cannot deliver, unmapped access) or the guest
  takes an unexpected exception (its vectors report it);
- hangs: fewer heartbeats than that within the observation time, nothing reported.

The source keeps running between trials (each trial pauses it, snapshots, resumes), so every
trial migrates the same running guest at a different moment.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from livemig.arm import Armv8Machine, regs
from livemig.contract import MachineConfig, MachineState
from livemig.probe import ProbeKind

# group name -> (vCPU map names, VM field names, device names) left out together
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "none": ((), (), ()),
    "x0-x30": (tuple(regs.GPRS), (), ()),
    "pc+pstate": (("pc", "pstate"), (), ()),
    "sp/elr/spsr": (("sp_el0", "sp_el1", "elr_el1", "spsr_el1"), (), ()),
    "v0-v31": (tuple(regs.VREGS), (), ()),
    "fpcr/fpsr": (("fpcr", "fpsr"), (), ()),
    "el1 mmu": (("sctlr_el1", "tcr_el1", "ttbr0_el1", "ttbr1_el1", "mair_el1", "amair_el1"),
                (), ()),
    "el1 vbar": (("vbar_el1",), (), ()),
    "el1 cpacr": (("cpacr_el1",), (), ()),
    "el1 syndrome": (("esr_el1", "far_el1", "afsr0_el1", "afsr1_el1", "par_el1"), (), ()),
    "el1 thread ids": (("tpidr_el0", "tpidrro_el0", "tpidr_el1", "contextidr_el1"), (), ()),
    "el1 other": (("csselr_el1", "mdscr_el1", "cntkctl_el1"), (), ()),
    "timer regs": (("cntv_ctl_el0", "cntv_cval_el0", "cntp_ctl_el0", "cntp_cval_el0"), (), ()),
    "counter": ((), ("cntvct",), ()),
    "gic": ((), (), ("gic",)),
}
SETTLE_S = 0.2
MIN_HEARTBEATS = 3  # per vCPU, within the observation time, for "survives"
OUTCOMES = ("survives", "wrong values", "crashes", "hangs")
# cpustate with long spins: nearly every snapshot falls inside a round, with every register
# it checks loaded (with short rounds many snapshots fall between them, where nothing is live)
GUESTS = {"cpustate": "hb=50 spins=400000", "idle": "tick=20"}


class EssentialError(Exception):
    """The experiment cannot run (bad group name, guest does not start); message for the user."""


@dataclass
class Trial:
    """One migration with one group left out."""

    guest: str
    group: str
    outcome: str
    detail: str
    heartbeats_after: int
    pc: int  # vCPU 0's PC in the snapshot: where the guest was when it moved

    def to_dict(self) -> dict[str, Any]:
        return {"guest": self.guest, "group": self.group, "outcome": self.outcome,
                "detail": self.detail, "heartbeats_after": self.heartbeats_after,
                "pc": self.pc}


def check_groups(names: Sequence[str]) -> list[str]:
    """The groups asked for, in table order; EssentialError on an unknown name."""
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise EssentialError(f"unknown state group {unknown[0]!r}; groups: {', '.join(GROUPS)}")
    return [g for g in GROUPS if g in names]


def leave_out(state: MachineState, fresh: MachineState, group: str) -> MachineState:
    """`state` with `group` replaced by the values of `fresh` (a destination's own)."""
    names, vm_names, devices = GROUPS[group]
    out = MachineState.decode(state.encode())
    for mine, theirs in zip(out.vcpus, fresh.vcpus, strict=True):
        for n in names:
            mine[n] = theirs[n]
    for n in vm_names:
        out.vm[n] = fresh.vm[n]
    for n in devices:
        out.devices[n] = fresh.devices[n]
    return out


def _last_heartbeats(m: Armv8Machine) -> dict[int, int]:
    return {e.vcpu: e.value for e in m.probe.events(ProbeKind.HEARTBEAT)}


def _wait_heartbeats(m: Armv8Machine, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    want = set(range(m.config.vcpus))
    while time.monotonic() < deadline:
        if want <= set(_last_heartbeats(m)):
            return
        time.sleep(0.02)
    raise EssentialError(f"the guest did not heartbeat on every vCPU within {timeout:.0f} s"
                         + (f": {m.error}" if m.error else ""))


def classify(dst: Armv8Machine, before: dict[int, int]) -> tuple[str, str, int]:
    """(outcome, detail, heartbeats seen) of a destination that has run its observation time."""
    fail = dst.probe.first_failure
    if dst.faults:
        return "crashes", dst.faults[0].split("stopped: ", 1)[-1], 0
    hbs = dst.probe.events(ProbeKind.HEARTBEAT)
    if fail is not None:
        if fail.value >= 0xE000:  # the guest's vectors reported an exception
            return "crashes", f"guest exception, vector {fail.value - 0xE000}", len(hbs)
        return "wrong values", f"guest check failed: value {fail.value} aux {fail.aux:#x}", len(hbs)
    if not hbs:
        return "hangs", "no heartbeat", 0
    per_cpu: dict[int, list[int]] = {}
    for e in hbs:
        per_cpu.setdefault(e.vcpu, []).append(e.value)
    for cpu, last in before.items():
        got = per_cpu.get(cpu, [])
        if got and not last < got[0] <= last + 3:
            return "wrong values", f"vCPU {cpu} heartbeat {got[0]} after {last}", len(hbs)
        if len(got) < MIN_HEARTBEATS:  # one already due at the switch-over is not "going on"
            return "hangs", f"vCPU {cpu}: {len(got)} heartbeats, then none", len(hbs)
    return "survives", "", len(hbs)


def trial(src: Armv8Machine, guest: str, group: str, observe: float) -> Trial:
    """Snapshot the running source, restore it without `group`, watch the destination."""
    # Let the source run undisturbed first: while this thread holds the GIL (the previous
    # trial's copies) a vCPU waits in its next Python hook, and the pause would land there.
    time.sleep(SETTLE_S)
    src.pause()
    try:
        state = src.save_state()
        ram = bytes(src.memory.view())
        before = _last_heartbeats(src)
    finally:
        src.resume()
    dst = Armv8Machine(MachineConfig.from_dict(src.config.to_dict()))
    try:
        dst.memory.view()[:] = ram
        dst.load_state(leave_out(state, dst.save_state(), group))
        dst.start()
        time.sleep(observe)
        dst.pause()
        outcome, detail, n = classify(dst, before)
    finally:
        dst.close()
    return Trial(guest, group, outcome, detail, n, state.vcpus[0]["pc"])


def summary(trials: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """(most severe outcome, "outcome xN, ..." in severity order) of one cell's trials."""
    counts = {o: sum(1 for t in trials if t["outcome"] == o) for o in OUTCOMES}
    seen = [o for o in reversed(OUTCOMES) if counts[o]]
    return seen[0], ", ".join(f"{o} x{counts[o]}" for o in seen)


def run(configs: dict[str, MachineConfig], groups: Sequence[str], observe: float = 1.5,
        repeat: int = 1) -> dict[str, Any]:
    """Every guest x group trial, `repeat` times (the migration moment differs); the report."""
    trials: list[Trial] = []
    for guest, config in configs.items():
        src = Armv8Machine(config)
        try:
            src.start()
            _wait_heartbeats(src, 30)
            for _ in range(repeat):
                for group in groups:
                    trials.append(trial(src, guest, group, observe))
        finally:
            src.close()
    return {
        "benchmark": "essential-state",
        "observe_s": observe,
        "repeat": repeat,
        "guests": {g: {"cmdline": c.cmdline, "vcpus": c.vcpus, "mem_size": c.mem_size}
                   for g, c in configs.items()},
        "groups": {g: {"vcpu": list(GROUPS[g][0]), "vm": list(GROUPS[g][1]),
                       "devices": list(GROUPS[g][2])} for g in groups},
        "trials": [t.to_dict() for t in trials],
    }


def plot(report: dict[str, Any], path: str) -> None:
    """A grid: one row per group, one column per guest, coloured by outcome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    guests = list(report["guests"])
    groups = list(report["groups"])
    colour = {"survives": "#4caf50", "wrong values": "#ff9800", "crashes": "#e53935",
              "hangs": "#7e57c2"}
    cell = {(g, grp): summary([t for t in report["trials"]
                               if t["guest"] == g and t["group"] == grp])
            for g in guests for grp in groups}
    fig, ax = plt.subplots(figsize=(2.2 + 2.6 * len(guests), 0.9 + 0.38 * len(groups)))
    for x, g in enumerate(guests):
        for y, grp in enumerate(groups):
            worst, text = cell[(g, grp)]
            ax.add_patch(plt.Rectangle((x, y), 0.95, 0.9, color=colour.get(worst, "#cccccc")))
            ax.text(x + 0.47, y + 0.45, text, ha="center", va="center", fontsize=6)
    ax.set_xlim(0, len(guests))
    ax.set_ylim(len(groups), 0)
    ax.set_xticks([i + 0.47 for i in range(len(guests))], guests)
    ax.set_yticks([i + 0.45 for i in range(len(groups))], groups)
    ax.set_title("ARMv8 guest after migration with one state group left out")
    ax.legend(handles=[Patch(color=c, label=o) for o, c in colour.items()],
              loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=4, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
