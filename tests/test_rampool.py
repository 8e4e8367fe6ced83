"""RAM on huge pages (`hugeshm`) and RAM allocated ahead (`rampool`, `listen --prealloc`)."""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import MachineProcess, migrate_verify_guest, run_cli

from livemig.contract import BackingKind, ConfigError, MemoryBacking
from livemig.hugeshm import HugeUnavailable, open_huge
from livemig.ram import open_ram
from livemig.rampool import RamPool

MiB = 1 << 20
needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                               reason="needs /dev/kvm (KVM guests)")


def huge_or_skip(size: int) -> int:
    try:
        return open_huge(size)
    except HugeUnavailable as e:
        pytest.skip(f"no private huge-page tmpfs here: {e.strerror}")


def pmd_mapped_kb(addr: int) -> int:
    """ShmemPmdMapped of the mapping at `addr`, from /proc/self/smaps."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{addr:x}" or line.startswith(f"{addr:012x}-"):
            for rest in lines[i + 1:]:
                if rest.startswith("ShmemPmdMapped:"):
                    return int(rest.split()[1])
    raise AssertionError(f"no mapping at {addr:#x} in smaps")


def test_huge_ram_file_is_zero_private_and_on_huge_pages() -> None:
    mounts_before = Path("/proc/self/mountinfo").read_text()
    fd = huge_or_skip(8 * MiB)
    try:
        assert os.fstat(fd).st_size == 8 * MiB
        m = mmap.mmap(fd, 8 * MiB)
        a = np.frombuffer(m, dtype=np.uint8)
        assert not a.any()  # reads as zero, and reading allocated it
        a[:] = 7
        from livemig.ram import host_address
        if Path("/sys/kernel/mm/transparent_hugepage").is_dir():
            assert pmd_mapped_kb(host_address(m)) >= 2048, "no 2 MiB page mapped"
        del a
        m.close()
    finally:
        os.close(fd)
    # never attached anywhere: nobody sees a new mount
    assert Path("/proc/self/mountinfo").read_text() == mounts_before


def test_pool_gives_its_ram_once_to_a_machine_that_fits() -> None:
    pool = RamPool(8 * MiB)
    pool.fill()
    try:
        assert pool.take(16 * MiB) is None  # too big: the pool keeps it
        b = pool.take(4 * MiB)
        assert b is not None and b.kind is BackingKind.PREPARED and len(b.fds) == 1
        assert pool.take(4 * MiB) is None  # taken
        ram = open_ram(4 * MiB, b, "t")
        try:
            assert os.fstat(b.fds[0]).st_size == 4 * MiB  # trimmed to the machine's size
            assert not np.frombuffer(ram.map, dtype=np.uint8).any()
        finally:
            ram.close()
        pool.refill()
        deadline = time.monotonic() + 20
        while (again := pool.take(8 * MiB)) is None:
            assert time.monotonic() < deadline, "the pool never filled again"
            time.sleep(0.05)
        os.close(again.fds[0])
    finally:
        pool.close()
    pool.refill()  # closed: nothing is made again
    assert pool.take(8 * MiB) is None


def test_a_closed_pool_frees_what_a_fill_still_made() -> None:
    pool = RamPool(4 * MiB)
    pool.close()
    pool.fill()  # a refill that ran on while the listener closed the pool
    assert pool.take(4 * MiB) is None


def test_prepared_ram_smaller_than_the_machine_is_refused() -> None:
    fd = os.memfd_create("small")
    os.ftruncate(fd, 2 * MiB)
    with pytest.raises(ConfigError, match="prepared RAM holds"):
        open_ram(4 * MiB, MemoryBacking(BackingKind.PREPARED, (fd,)), "t")
    with pytest.raises(OSError):
        os.fstat(fd)  # taken over: closed, whatever happened


def test_prealloc_more_than_the_host_has_is_bad_input() -> None:
    res = run_cli("listen", "--port", "0", "--insecure", "--prealloc", "64T")
    assert res.returncode == 2
    assert "--prealloc" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@needs_kvm
def test_migration_into_ram_allocated_ahead(machines: Callable[..., MachineProcess],
                                            tmp_path: Path) -> None:
    said: list[str] = []
    migrate_verify_guest(machines, tmp_path, listen_args=("--prealloc", "256M"),
                         listener_said=said)
    text = "".join(said)
    assert "256 MiB of RAM allocated ahead" in text, text
    assert "the machine's RAM was allocated ahead" in text, text
