"""The package-tree cache: each backend tree is built once and never copied.

A backend's tree -- every package installed, no layer applied yet -- goes to
``$CACHE/trees/<tree_digest>`` by rename, and stays as it is. Every compose, the one
that built it too, works on an overlayfs view of it (:func:`overlay`): the layers,
hooks, scrub and the rest write into an upper directory in the work directory, and
the squashfs is made from the merged view. A compose that changes only layers (a
site layer, the version) installs nothing; one that builds the tree copies nothing.

The tree's timestamps are clamped before it is kept (:func:`store`), so that the
compose's final clamp touches only what the layers wrote and nothing is copied up
for its mtime alone. Compose holds the cache lock throughout, so a kept tree is
never removed under a compose that uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from ..image.spec import ImageSpec
from ..run import run
from . import debpkg
from .chroot import remove_tree
from .postprocess import clamp_mtimes

KEPT = 2  # package trees in the cache (~0.7 GiB each), the most recently used


def tree_digest(image: ImageSpec, backend: str) -> str:
    """The package tree's cache key: what the backend builds it from, and nothing else."""
    fields = {"backend": backend, "packages": image.packages,
              "imgbase": debpkg.source_digest() if any(
                  layer.imgbase_package for layer in image.layers) else None,
              **{k: getattr(image, k) for k in (
                  "distro", "suite", "architecture", "mirror", "security_mirror", "repos",
                  "gpgkeys", "unsigned", "source_date_epoch")}}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def lookup(trees: Path, key: str) -> Path | None:
    """The kept tree for key, marked most recently used; None if there is none."""
    entry = trees / key
    if not entry.is_dir():
        return None
    os.utime(entry)
    return entry


def store(trees: Path, key: str, tree: Path, epoch: int) -> tuple[Path, threading.Thread]:
    """Keep the freshly built tree (moved, not copied) as key's entry.

    Returns the entry and a thread removing what it replaced or pushed out (the
    entry of the same key under ``--rebuild``, trees beyond :data:`KEPT`): join it
    before the compose ends. tree must be on the cache's filesystem.
    """
    trees.mkdir(parents=True, exist_ok=True)
    clamp_mtimes(tree, epoch)
    retired = list(trees.glob(".*"))  # left by a compose that was killed
    entry = trees / key
    if entry.exists():
        aside = trees / f".retired-{key}-{os.getpid()}"
        os.replace(entry, aside)
        retired.append(aside)
    os.replace(tree, entry)
    os.utime(entry)  # most recently used (a merged view's root has the upper's times)
    kept = sorted((p for p in trees.iterdir() if not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for i, old in enumerate(kept[KEPT:]):
        aside = trees / f".retired-{i}-{os.getpid()}"
        os.replace(old, aside)
        retired.append(aside)

    def remove_retired() -> None:
        for path in retired:
            remove_tree(path)

    remover = threading.Thread(target=remove_retired, name="trees-remove", daemon=True)
    remover.start()
    return entry, remover


@contextlib.contextmanager
def overlay(lower: Path, work: Path, merged: Path) -> Iterator[Path]:
    """merged: a writable view of lower, which stays untouched; writes go to work/upper.

    lower and work must be on one filesystem with the cache directory. The mount's
    options name them relative to their common parent, so that no path needs escaping
    (overlayfs splits its options on commas and colons). ``redirect_dir``: a layer may
    rename a directory it did not create (the package database moves).
    """
    base = Path(os.path.commonpath([lower, work]))
    upper, scratch = work / "upper", work / "overlay-work"
    for d in (upper, scratch, merged):
        d.mkdir()
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower.relative_to(base)},upperdir={upper.relative_to(base)},"
         f"workdir={scratch.relative_to(base)},redirect_dir=on", str(merged)], cwd=base)
    try:
        yield merged
    finally:
        run(["umount", "--lazy", str(merged)], check=False)
