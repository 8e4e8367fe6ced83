"""ARMv8 board: exception delivery, the GIC, the generic timer, and their state across migration.

Real AArch64 guests (guests/arm64): `traps` takes an SVC, aborts, an undefined instruction, a BRK
and a PL011 interrupt and checks what its vectors saw; `idle` sleeps in WFI between timer
interrupts, CPU 0 sends SGIs to the others, and it counts SPI 40 edges the host raises.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from conftest import AUTH, Listener, MachineProcess, run_cli, wait_for
from test_arm_cli import arm_image, failures
from test_arm_machine import IMAGES, MEM, machine, migrate
from test_arm_machine import wait_for as wait_probe

from livemig.arm import Armv8Machine
from livemig.arm.gic import N_IRQ, PPI_CNTV, Gic
from livemig.contract import Arch, MachineConfig, MachineState, StateError
from livemig.probe import ProbeKind

DOORBELL = 40


def events(m: Armv8Machine, kind: ProbeKind, vcpu: int | None = None) -> list[tuple[int, int]]:
    return [(e.value, e.aux) for e in m.probe.events(kind) if vcpu is None or e.vcpu == vcpu]


def test_svc_aborts_undefined_and_uart_interrupt_reach_the_guest_vectors() -> None:
    lines: list[bytes] = []
    m = Armv8Machine(MachineConfig(Arch.ARM64, MEM, 1, str(IMAGES / "traps.elf"), "tick=20"),
                     console=lines.append)
    try:
        m.start()
        wait_probe(m, ProbeKind.OK, 3)
        m.pause()
        assert m.probe.counts[ProbeKind.FAIL] == 0, m.probe.first_failure
        assert m.faults == [] and m.error is None
        oks = [ln.decode() for ln in lines if b"traps ok" in ln]
        # ESR: SVC #0x1234 (EC 0x15), data abort same EL (EC 0x25, external, WnR for the
        # store), unknown (EC 0), BRK #0x77 (EC 0x3C); FAR = the address that reached nothing
        want = ("svc esr=0x56001234 dabt-ld esr=0x96000010 far=0xb000000 "
                "dabt-st esr=0x96000050 far=0xb000008 undef esr=0x2000000 brk esr=0xf2000077")
        assert oks and all(want in ln for ln in oks), oks[:2]
        assert [v for v, _ in events(m, ProbeKind.OK)] == list(range(1, len(oks) + 1))
    finally:
        m.close()


def test_idle_takes_timer_interrupts_and_sgis_between_vcpus() -> None:
    m = machine("idle", 2, "tick=10")
    try:
        m.start()
        wait_probe(m, ProbeKind.HEARTBEAT, 30)
        m.pause()
        assert m.probe.counts[ProbeKind.FAIL] == 0, m.probe.first_failure
        for cpu in (0, 1):
            hbs = [v for v, _ in events(m, ProbeKind.HEARTBEAT, cpu)]
            assert hbs and hbs == sorted(set(hbs)), hbs
        # vCPU 1's heartbeats carry the SGIs it received from vCPU 0 (the guest FAILs on any
        # other source); they grow with vCPU 0's ticks
        sgis = [aux for _, aux in events(m, ProbeKind.HEARTBEAT, 1)]
        assert sgis[-1] > sgis[0] >= 0 and sgis == sorted(sgis), sgis
    finally:
        m.close()


def test_wfi_idle_guest_leaves_the_host_cpu_alone() -> None:
    """WFI sleeps until the next interrupt: 20 ticks/s cost far less than a busy vCPU."""
    m = machine("idle", 1, "tick=50")
    try:
        m.start()
        wait_probe(m, ProbeKind.HEARTBEAT, 2)
        t0 = time.process_time()
        hb0 = m.probe.counts[ProbeKind.HEARTBEAT]
        time.sleep(1.0)
        used = time.process_time() - t0
        assert m.probe.counts[ProbeKind.HEARTBEAT] > hb0
        assert used < 0.5, f"idle guest used {used:.2f} s of CPU in 1 s"
    finally:
        m.close()


def distinct_gic_state(gic: Gic) -> None:
    """Give every field of the GIC a value different from reset."""
    c = gic.ncpus
    gic.dist_ctlr = 1
    gic.enabled = [[(i + k) % 2 == 0 for i in range(N_IRQ)] for k in range(c)]
    gic.latched = [[(i + k) % 3 == 0 for i in range(N_IRQ)] for k in range(c)]
    gic.active = [[(i + k) % 5 == 0 for i in range(N_IRQ)] for k in range(c)]
    gic.level = [[(i + k) % 7 == 0 and i != PPI_CNTV and i != 30 for i in range(N_IRQ)]
                 for k in range(c)]
    gic.priority = [[(i * 7 + k) & 0xFF for i in range(N_IRQ)] for k in range(c)]
    gic.edge = [[i % 2 == 1 for i in range(N_IRQ)] for _ in range(c)]
    gic.target = [(i % 3) for i in range(N_IRQ)]
    gic.sgi_sources = [[(i + k) % 4 for i in range(16)] for k in range(c)]
    gic.cpu_ctlr = [1] * c
    gic.pmr = [0xF0 - k for k in range(c)]
    gic.bpr = [3 + k for k in range(c)]
    gic.running = [[5, 27 + k] for k in range(c)]


def test_gic_and_timer_state_round_trip_field_by_field() -> None:
    a, b = machine("idle", 2), machine("idle", 2)
    reset = b.save_state()
    try:
        distinct_gic_state(a.gic)
        timer = {"cntv_ctl_el0": 3, "cntv_cval_el0": 0x1234_5678_9ABC,
                 "cntp_ctl_el0": 1, "cntp_cval_el0": 0x5555}
        for k in range(2):
            a.set_registers(k, {n: v + k for n, v in timer.items()})
        saved = a.save_state()
        b.load_state(MachineState.decode(saved.encode()))
        again = b.save_state()
        for field in Gic.FIELDS:
            assert again.devices["gic"][field] == saved.devices["gic"][field], field
            assert saved.devices["gic"][field] != reset.devices["gic"][field], field
        for k in range(2):
            for n, v in timer.items():
                assert again.vcpus[k][n] == saved.vcpus[k][n] == v + k, n
                assert b.get_registers(k, [n]) == {n: v + k}
        # the destination's timers follow the loaded registers: vCPU 0's CNTP is enabled with
        # a deadline long past (its line is up), its CNTV is masked (IMASK); vCPU 1's CNTP
        # (CTL 2) is off
        assert b.gic.level[0][30] and not b.gic.level[0][PPI_CNTV] and not b.gic.level[1][30]
        damaged = MachineState.decode(saved.encode())
        del damaged.devices["gic"]["pmr"]
        before = b.save_state()
        with pytest.raises(StateError, match="gic"):
            b.load_state(damaged)
        assert b.save_state().devices["gic"] == before.devices["gic"]
    finally:
        a.close()
        b.close()


def test_interrupts_pending_at_switch_over_are_delivered_once_at_the_destination() -> None:
    src = machine("idle", 1, "tick=20")
    src.start()
    wait_probe(src, ProbeKind.HEARTBEAT, 5)
    src.pause()
    src.raise_spi(DOORBELL)  # an edge while paused: pending, not yet taken
    time.sleep(0.05)  # more than a tick: the timer's PPI is pending too
    last_hb = events(src, ProbeKind.HEARTBEAT)[-1][0]
    assert events(src, ProbeKind.OK) == []
    state = src.save_state()
    assert state.devices["gic"]["latched"][0][DOORBELL]
    assert state.devices["gic"]["level"][0][PPI_CNTV]
    dst = migrate(src)
    try:
        dst.start()
        wait_probe(dst, ProbeKind.OK, 1)
        wait_probe(dst, ProbeKind.HEARTBEAT, 5)
        time.sleep(0.2)
        dst.pause()
        assert dst.probe.counts[ProbeKind.FAIL] == 0, dst.probe.first_failure
        assert events(dst, ProbeKind.OK) == [(1, DOORBELL)]  # once: not lost, not doubled
        hbs = [v for v, _ in events(dst, ProbeKind.HEARTBEAT)]
        # the pending tick is taken first (a tick taken but not yet reported may add one)
        assert last_hb < hbs[0] <= last_hb + 2 and hbs == sorted(set(hbs)), (last_hb, hbs[:5])
    finally:
        dst.close()


def test_idle_keeps_its_heartbeat_across_a_live_migration(machines, tmp_path: Path) -> None:
    src: MachineProcess = machines(["run", arm_image("idle"), "--arch", "arm64", "--mem", "32M",
                                    "--vcpus", "2", "--append", "tick=20"], "src")
    src.wait_heartbeat_above(3)
    dst = Listener(tmp_path, console=tmp_path / "dst.console")
    try:
        res = run_cli("migrate", src.control, "--to", f"127.0.0.1:{dst.port}", *AUTH,
                      "--verify-memory", "--json")
        assert res.returncode == 0, res.stderr
        stats = json.loads(res.stdout)
        assert stats["status"] == "completed" and stats["verified_memory"] is True, stats
        assert src.proc.wait(15) == 0
        hb = re.compile(r"^idle hb (\d+) cpu=(\d+)$")

        def beats(console: Path) -> dict[int, list[int]]:
            out: dict[int, list[int]] = {}
            for ln in console.read_text(errors="replace").splitlines():
                if m := hb.match(ln.strip()):
                    out.setdefault(int(m.group(2)), []).append(int(m.group(1)))
            return out

        before = beats(src.console)
        console = tmp_path / "dst.console"
        wait_for(lambda: console.exists() and all(len(beats(console).get(c, [])) >= 5
                                                  for c in (0, 1)), 30,
                 "heartbeats on both vCPUs at the destination")
        after = beats(console)
        for cpu in (0, 1):
            last = before[cpu][-1]
            assert last < after[cpu][0] <= last + 2, (cpu, before[cpu][-3:], after[cpu][:3])
            assert after[cpu] == sorted(set(after[cpu]))
        assert failures(src.console) == [] and failures(console) == []
        assert dst.ctl("status")["probe"]["counts"]["fail"] == 0
        dst.ctl("quit")
    finally:
        dst.stop()


def test_timer_works_with_the_python_sysreg_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where native code cannot be built, every MRS/MSR goes to Python: same behaviour."""
    from types import SimpleNamespace

    from livemig.arm import sysreg_hook

    monkeypatch.setattr(sysreg_hook, "NativeCode",
                        lambda build: SimpleNamespace(address=None, why="refused (test)"))
    m = machine("idle", 2, "tick=10")
    try:
        assert m._sysregs.native.address is None
        m.start()
        wait_probe(m, ProbeKind.HEARTBEAT, 10)
        m.pause()
        assert m.probe.counts[ProbeKind.FAIL] == 0 and m.faults == []
    finally:
        m.close()


def test_gic_priorities_active_state_levels_and_sgi_sources() -> None:
    """The GIC model through its registers (what a guest's MMIO accesses reach)."""
    kicked: list[int] = []
    g = Gic(2, kicked.append)
    g.dist_write(0, 0x000, 4, 1)  # GICD_CTLR
    for cpu in (0, 1):
        g.cpu_write(cpu, 0x04, 0xFF)  # PMR
        g.cpu_write(cpu, 0x00, 1)  # GICC_CTLR
    g.dist_write(0, 0x104, 4, (1 << (40 - 32)) | (1 << (41 - 32)))  # ISENABLER1: SPI 40, 41
    g.dist_write(0, 0x400 + 40, 1, 0x80)
    g.dist_write(0, 0x400 + 41, 1, 0x40)
    g.dist_write(0, 0x800 + 40, 2, 0x0101)  # SPI 40 and 41 to vCPU 0
    g.dist_write(0, 0xC08, 4, 0b1010 << 16)  # ICFGR2: SPI 40, 41 edge-triggered
    assert not g.irq_line(0)
    g.pulse(40)
    g.pulse(41)
    assert g.irq_line(0) and not g.irq_line(1) and 0 in kicked
    assert g.cpu_read(0, 0x0C) == 41  # IAR: the higher priority (lower value) first
    assert g.cpu_read(0, 0x14) == 0x40  # running priority
    assert not g.irq_line(0)  # 40 (0x80) does not preempt the active 41 (0x40)
    g.cpu_write(0, 0x10, 41)  # EOIR
    assert g.irq_line(0) and g.cpu_read(0, 0x0C) == 40
    g.cpu_write(0, 0x10, 40)
    assert not g.irq_line(0) and g.cpu_read(0, 0x0C) == 1023 and g.cpu_read(0, 0x14) == 0xFF
    # a level-triggered PPI stays pending while its line is high, also across its EOI
    g.dist_write(1, 0x100, 4, 1 << PPI_CNTV)  # banked: vCPU 1's PPI 27
    g.dist_write(1, 0x400 + PPI_CNTV, 1, 0x20)
    g.set_level(1, PPI_CNTV, True)
    assert g.irq_line(1) and not g.irq_line(0)
    assert g.cpu_read(1, 0x0C) == PPI_CNTV
    g.cpu_write(1, 0x10, PPI_CNTV)
    assert g.irq_line(1)  # still high: pending again
    assert g.cpu_read(1, 0x0C) == PPI_CNTV
    g.set_level(1, PPI_CNTV, False)  # the handler moved the deadline
    g.cpu_write(1, 0x10, PPI_CNTV)
    assert not g.irq_line(1)
    # SGI 3 from vCPU 1 to vCPU 0: IAR names the source in bits 12:10
    g.dist_write(0, 0x100, 4, 1 << 3)
    g.dist_write(1, 0xF00, 4, (1 << 16) | 3)
    assert g.irq_line(0) and g.cpu_read(0, 0x0C) == 3 | 1 << 10
    g.cpu_write(0, 0x10, 3 | 1 << 10)
    assert not g.irq_line(0)
