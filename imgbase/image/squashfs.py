"""The squashfs image: made from a tree, hashed, and read -- every ``unsquashfs`` imgbase
runs is built here."""

from __future__ import annotations

import hashlib
from pathlib import Path
from subprocess import CompletedProcess

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


def unpack_argv(image: str | Path, dest: str | Path, *members: str,
                force: bool = False) -> tuple[str, ...]:
    """The command that unpacks ``members`` (all when none) of image into dest (a plan
    step runs it as it is)."""
    return ("unsquashfs", "-q", "-n", *(("-f",) if force else ()), "-d", str(dest),
            str(image), *members)


def unpack(image: str | Path, dest: str | Path, *members: str) -> None:
    run(list(unpack_argv(image, dest, *members)))


def readable(image: str | Path) -> CompletedProcess[str]:
    """``unsquashfs -s``: the superblock read, returncode 0 when the image is whole."""
    return run(["unsquashfs", "-s", str(image)], check=False)


def cat(image: str | Path, member: str) -> str | None:
    """One file of the image, or None when it has none there."""
    proc = run(["unsquashfs", "-cat", str(image), member], check=False)
    return proc.stdout if proc.returncode == 0 else None


def names(image: str | Path, directory: str) -> list[str]:
    """The paths under directory in the image (``/boot/vmlinuz-...``)."""
    return run(["unsquashfs", "-l", "-d", "", str(image), directory]).stdout.split()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
