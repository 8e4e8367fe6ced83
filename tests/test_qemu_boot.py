"""Boot the hotset guest image under qemu-system-x86_64 and watch its heartbeats.

Proves that guests/build/hotset.elf is a working multiboot image (32-bit entry, long mode,
UART, TSC calibration) independently of livemig's own hypervisor.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "guests" / "build" / "hotset.elf"
QEMU = "qemu-system-x86_64"
DEADLINE_S = 20.0
WANT_HEARTBEATS = 3

HB_RE = re.compile(r"^hotset hb (\d+)$")


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _reader(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode(errors="replace").strip())
    lines.put(None)


def test_hotset_heartbeats_under_qemu() -> None:
    qemu = shutil.which(QEMU)
    if qemu is None:
        pytest.skip(f"{QEMU} is not installed")
    if not IMAGE.is_file():
        pytest.skip(f"{IMAGE} is missing; build it with `make -C guests`")
    accel = ["-enable-kvm"] if _kvm_usable() else ["-accel", "tcg"]
    cmd = [qemu, *accel, "-m", "128M", "-smp", "1", "-nodefaults", "-display", "none",
           "-no-reboot", "-serial", "stdio", "-kernel", str(IMAGE), "-append", "wss=16M"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    beats: list[int] = []
    try:
        end = time.monotonic() + DEADLINE_S
        while len(beats) < WANT_HEARTBEATS:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            assert "FAIL" not in line, f"guest reported a failure: {line}"
            m = HB_RE.match(line)
            if m:
                beats.append(int(m.group(1)))
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    tail = "\n".join(seen[-10:])
    assert "hotset boot cpus=1" in seen, (
        f"no boot report ({' '.join(accel)}); serial:\n{tail}\nstderr:\n{err.decode()[-500:]}")
    assert len(beats) >= WANT_HEARTBEATS, (
        f"only {len(beats)} heartbeats in {DEADLINE_S:.0f} s ({' '.join(accel)}); serial:\n{tail}")
    increasing = all(a < b for a, b in zip(beats, beats[1:], strict=False))
    assert increasing, f"heartbeats not increasing: {beats}"
