"""The raw copy again, with the row's guest running beside it (not migrating).

The yardstick (`rawcopy`) is measured on an idle host: both cores free for its sender and
receiver. A live migration never has that: the guest it moves keeps running, and a busy vCPU
holds a core. This second figure is the same copy of the same size, measured in the same run
while a `livemig run` of the row's guest (same image, RAM and command line) runs on this
host: what even the plainest copy reaches under the load every live migration of that guest
works under. It puts the throughput goal in context; it does not replace it.
"""

from __future__ import annotations

from collections.abc import Callable

from livemig.bench.procs import Procs, ProcsError

BOOT_TIMEOUT_S = 120.0


def beside_guest(image: str, mem: int, cmdline: str,
                 measure: Callable[[], float | str]) -> float | str:
    """Run `measure` (a raw copy: bytes/s, or why it failed) while a guest of `image` with
    `mem` bytes of RAM and `cmdline` runs on this host; its result, or why the guest did not
    start."""
    procs = Procs("livemig-loaded-")
    try:
        args = ["run", image, "--mem", f"{mem >> 20}M"]
        if cmdline:
            args += ["--append", cmdline]
        procs.machine("guest", args, timeout=BOOT_TIMEOUT_S)
        return measure()
    except ProcsError as e:
        return f"the guest beside the copy did not start: {e}"
    finally:
        procs.close()
