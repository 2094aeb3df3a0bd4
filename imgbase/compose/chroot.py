"""Run commands inside a root tree, and remove trees without crossing mounts."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .. import intree
from ..errors import ImgbaseError
from ..run import run

API_MOUNTS = (
    ("proc", ["-t", "proc", "proc"]),
    ("sys", ["-t", "sysfs", "sysfs"]),
    ("dev", ["--bind", "/dev"]),
    ("dev/pts", ["--bind", "/dev/pts"]),
    ("run", ["-t", "tmpfs", "-o", "mode=0755", "tmpfs"]),
)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = os.path.realpath(path)
    found = []
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            target = line.split()[1].encode().decode("unicode_escape")
            if target == prefix or target.startswith(prefix + "/"):
                found.append(target)
    return sorted(found, key=len, reverse=True)


def unmount_all(path: Path) -> None:
    for target in mounts_under(path):
        run(["umount", "--lazy", target], check=False)


@contextlib.contextmanager
def api_filesystems(tree: Path) -> Iterator[None]:
    """/proc, /sys, /dev and /run mounted in the tree for the duration.

    Each mount point resolved inside the tree (mount follows symlinks: a tree's
    ``run -> /run`` would otherwise mount over the build host's)."""
    done: list[Path] = []
    try:
        for rel, args in API_MOUNTS:
            target = intree.resolve(tree, rel, create=True)
            run(["mount", *args, str(target)])
            done.append(target)
        yield
    finally:
        for target in reversed(done):
            run(["umount", "--lazy", str(target)], check=False)


def chroot_run(tree: Path, argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """Run argv inside the tree (API filesystems must be mounted); return stdout."""
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8"}
    return run(["env", "-i", *[f"{k}={v}" for k, v in {**base, **(env or {})}.items()],
                "chroot", str(tree), *argv]).stdout


def remove_tree(path: Path) -> None:
    """Remove a build tree; never follow a mount point out of it."""
    if not path.exists():
        return
    unmount_all(path)
    if mounts_under(path):
        raise ImgbaseError(f"{path} still has mounts: {mounts_under(path)}; not removing it",
                           hint="unmount them by hand, then remove the directory")
    run(["rm", "-rf", "--one-file-system", str(path)])
