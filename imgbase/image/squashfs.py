"""The squashfs image: made from a tree, hashed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..run import run


def make_squashfs(tree: Path, out: Path, compression: str, level: int, epoch: int) -> None:
    # mksquashfs refuses SOURCE_DATE_EPOCH together with -mkfs-time: timestamps are
    # clamped in the tree beforehand and the creation time is given explicitly.
    argv = ["env", "-u", "SOURCE_DATE_EPOCH", "mksquashfs", str(tree), str(out),
            "-noappend", "-no-progress", "-quiet", "-reproducible",
            "-comp", compression, "-mkfs-time", str(epoch)]
    if compression in ("zstd", "gzip"):
        argv += ["-Xcompression-level", str(level)]
    run(argv)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
