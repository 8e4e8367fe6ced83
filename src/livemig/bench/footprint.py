"""Host memory taken by machine processes: proportional set size (PSS) and MemAvailable.

PSS divides each shared page among the processes mapping it, so the PSS of N clones of one
template adds up to the template's pages once plus each clone's own pages, while N ordinary
machines count every page N times.
"""

from __future__ import annotations

import re
from pathlib import Path

_RAM_MAPPING = re.compile(r"memfd:livemig-(arm-)?ram|/memory(\s\(deleted\))?$")


def _kib_field(text: str, name: str) -> int:
    m = re.search(rf"^{name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def rollup_pss(pid: int) -> int:
    """Bytes: the process's whole PSS (`/proc/PID/smaps_rollup`)."""
    return _kib_field(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss")


def ram_pss(pid: int) -> int:
    """Bytes: PSS of the process's guest-RAM mapping(s) only (the RAM memfd, or a
    template's memory file for a clone), from `/proc/PID/smaps`."""
    total = 0
    in_ram = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            in_ram = bool(_RAM_MAPPING.search(line))
        elif in_ram and line.startswith("Pss:"):
            total += int(line.split()[1]) * 1024
    return total


def mem_available() -> int:
    """Bytes: the host's MemAvailable."""
    return _kib_field(Path("/proc/meminfo").read_text(), "MemAvailable")
