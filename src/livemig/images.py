"""Where the committed guest images are: `guests/build/` (x86-64), `guests/arm64/build/`."""

from __future__ import annotations

import os
from pathlib import Path

from livemig.contract import Arch, ImageError

ROOT = Path(__file__).resolve().parents[2]


def guest_image(name: str, arch: Arch = Arch.X86_64) -> str:
    """Path of a workload image (`hotset`, `verify`, ...); LIVEMIG_GUESTS overrides the folder."""
    base = os.environ.get("LIVEMIG_GUESTS")
    folder = Path(base) if base else ROOT / "guests" / (
        "build" if arch is Arch.X86_64 else "arm64/build")
    path = folder / f"{name}.elf"
    if not path.is_file():
        raise ImageError(f"guest image {path} does not exist (build it with `make -C guests`)")
    return str(path)
