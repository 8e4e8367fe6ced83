"""ARMv8 board: real AArch64 guests on unicorn, saved and restored into fresh machines."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from livemig.arm import Armv8Machine
from livemig.contract import Arch, ConfigError, MachineConfig, MachineState
from livemig.probe import ProbeKind

IMAGES = Path(__file__).resolve().parent.parent / "guests" / "arm64" / "build"
MEM = 64 << 20


def machine(guest: str, vcpus: int = 2, cmdline: str = "wss=16M") -> Armv8Machine:
    cfg = MachineConfig(Arch.ARM64, MEM, vcpus, str(IMAGES / f"{guest}.elf"), cmdline)
    return Armv8Machine(cfg)


def last_per_vcpu(m: Armv8Machine, kind: ProbeKind) -> dict[int, int]:
    out: dict[int, int] = {}
    for e in m.probe.events(kind):
        out[e.vcpu] = e.value
    return out


def wait_for(m: Armv8Machine, kind: ProbeKind, n: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while m.probe.counts[kind] < n and time.monotonic() < end:
        time.sleep(0.05)
    assert m.probe.counts[kind] >= n, f"only {m.probe.counts[kind]} {kind.name} reports"


def migrate(src: Armv8Machine) -> Armv8Machine:
    """Pause, save state + RAM, close the source, rebuild a fresh machine as a new process would."""
    src.pause()
    blob = src.save_state().encode()
    ram = bytes(src.memory.view())
    cfg = MachineConfig.from_dict(src.config.to_dict())
    src.close()
    dst = Armv8Machine(cfg)
    dst.memory.view()[:] = ram
    dst.load_state(MachineState.decode(blob))
    return dst


@pytest.mark.parametrize("guest", ["verify", "cpustate"])
def test_save_restore_two_vcpus_keeps_guest_going(guest: str) -> None:
    src = machine(guest)
    src.start()
    wait_for(src, ProbeKind.OK, 4)
    wait_for(src, ProbeKind.HEARTBEAT, 6)
    src.pause()
    before_hb = last_per_vcpu(src, ProbeKind.HEARTBEAT)
    before_ok = last_per_vcpu(src, ProbeKind.OK)
    assert set(before_hb) == {0, 1} and src.probe.counts[ProbeKind.FAIL] == 0
    dst = migrate(src)
    try:
        dst.start()
        wait_for(dst, ProbeKind.OK, 6)
        wait_for(dst, ProbeKind.HEARTBEAT, 6)
        dst.pause()
        assert dst.probe.counts[ProbeKind.FAIL] == 0, dst.probe.first_failure
        assert dst.faults == []
        for cpu in (0, 1):
            hbs = [e.value for e in dst.probe.events(ProbeKind.HEARTBEAT) if e.vcpu == cpu]
            assert hbs and hbs[0] > before_hb[cpu], "heartbeat counter did not continue"
            assert hbs == sorted(set(hbs)), "heartbeat counter not strictly increasing"
        after_ok = last_per_vcpu(dst, ProbeKind.OK)
        assert any(after_ok.get(c, 0) > before_ok.get(c, 0) for c in (0, 1))
    finally:
        dst.close()


def test_verify_guest_detects_a_stale_page() -> None:
    # verify's region starts at the first 2 MiB boundary after its image and version table,
    # i.e. RAM offset 2 MiB here; an old copy of a page in it must be reported by the guest.
    src = machine("verify", vcpus=1, cmdline="wss=8M rate=1")
    src.start()
    wait_for(src, ProbeKind.OK, 2)
    dst = migrate(src)
    page = (6 << 20) // 4096
    dst.memory.view()[page * 4096 : (page + 1) * 4096] = b"\xff" * 4096
    try:
        dst.start()
        wait_for(dst, ProbeKind.FAIL, 1)
        fail = dst.probe.first_failure
        assert fail is not None and fail.value == page - (2 << 20) // 4096
    finally:
        dst.close()


def test_dirty_log_reports_exactly_the_pages_written() -> None:
    m = machine("hotset", vcpus=2, cmdline="wss=4M")
    try:
        m.start()
        wait_for(m, ProbeKind.HEARTBEAT, 4)
        m.pause()
        mem = m.memory
        mem.start_dirty_log()
        assert not mem.fetch_dirty().any()
        before = np.frombuffer(bytes(mem.view()), dtype=np.uint8).reshape(-1, 4096).copy()
        m.resume()
        time.sleep(0.3)
        m.pause()
        mem.view()[5 * 4096 + 17] ^= 0xFF  # the hypervisor writes a page too
        dirty = mem.fetch_dirty()
        after = np.frombuffer(bytes(mem.view()), dtype=np.uint8).reshape(-1, 4096)
        truth = (before != after).any(axis=1)
        assert dirty.dtype == bool and dirty.shape == (MEM // 4096,)
        assert np.array_equal(dirty, truth)
        assert dirty[5] and dirty.sum() >= 1024  # the 4 MiB working set, at least
        assert not mem.fetch_dirty().any()  # fetching clears
        mem.stop_dirty_log()
    finally:
        m.close()


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        Armv8Machine(MachineConfig(Arch.X86_64, MEM, 1))
    with pytest.raises(ConfigError):
        Armv8Machine(MachineConfig(Arch.ARM64, MEM, 5))


@pytest.mark.parametrize("guest,cmdline,throttle", [("cpustate", "hb=5", 0.0),
                                                    ("verify", "wss=4M rate=5000", 0.3)])
def test_pause_resume_soak_never_replays_an_instruction(guest: str, cmdline: str,
                                                        throttle: float) -> None:
    """Hundreds of pause/resume cycles on 2 vCPUs: no fault, no FAIL, no replayed report.

    Stopping unicorn from another thread (or by its timeout) can run an instruction twice
    (docs/arm-state.md); the machine stops vCPUs only from their own block hook. Before that,
    cpustate died here with UC_ERR_READ_UNMAPPED within a few hundred cycles.
    """
    m = machine(guest, cmdline=cmdline)
    replays = 0
    original = m._probe_dev._report

    def counting(vcpu: int, offset: int, value: int) -> None:
        nonlocal replays
        off = value - 0x4000_0000
        if bytes(m._ram[off : off + 32]) == m._probe_dev._last[vcpu]:
            replays += 1
        original(vcpu, offset, value)

    m._probe_dev._report = counting  # type: ignore[method-assign]
    try:
        assert m.exact_stop, "native stop hook unavailable on this host"
        m.start()
        m.set_throttle(throttle)
        wait_for(m, ProbeKind.OK, 2)
        oks = last_per_vcpu(m, ProbeKind.OK)
        cycles, worst, end = 0, 0.0, time.monotonic() + 6
        while time.monotonic() < end and not m.faults and not m.probe.counts[ProbeKind.FAIL]:
            time.sleep(0.01)
            t = time.monotonic()
            m.pause()
            worst = max(worst, time.monotonic() - t)
            cycles += 1
            m.resume()
        wait_for(m, ProbeKind.OK, m.probe.counts[ProbeKind.OK] + 2)
        m.pause()
        assert m.faults == [] and m.probe.counts[ProbeKind.FAIL] == 0, (
            m.faults, m.probe.first_failure)
        assert replays == 0, f"{replays} reports replayed after a stop"
        assert cycles >= 100 and worst < 2.0, (cycles, worst)  # liveness, not speed
        after = last_per_vcpu(m, ProbeKind.OK)
        assert all(after[c] > oks.get(c, 0) for c in (0, 1)), (oks, after)
    finally:
        m.close()


def test_fallback_without_native_stop_hook_runs_and_pauses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the native stop hook cannot be built, slices are bounded by instruction count."""
    from livemig.arm import stop

    monkeypatch.setattr(stop, "_get_trampoline",
                        lambda: SimpleNamespace(address=None, why="refused (test)"))
    m = machine("cpustate", vcpus=1, cmdline="hb=20 spins=2000")
    assert not m.exact_stop
    try:
        m.start()
        wait_for(m, ProbeKind.OK, 2)
        for _ in range(20):
            m.pause()
            m.resume()
        wait_for(m, ProbeKind.OK, m.probe.counts[ProbeKind.OK] + 2)
        m.pause()
        assert m.faults == [] and m.probe.counts[ProbeKind.FAIL] == 0
    finally:
        m.close()
