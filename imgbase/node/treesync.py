"""Make a tree (a base being made) equal to a mounted image: only what changed is written.

    python3 -P -m imgbase.node.treesync IMAGE_DIR BASE_DIR [--mount IMAGE_FILE BASE_DEVICE]

When both trees carry a file listing (:mod:`imgbase.image.filelist`), the two listings are
compared, paths gone or changed in kind are removed, and rsync copies just the paths
that differ (``--files-from``, each written whole into the thin snapshot). Without a
listing on either side it is rsync over the whole tree, comparing every file's contents
(``--checksum``). Both end with BASE_DIR holding exactly IMAGE_DIR: contents, modes,
owners, mtimes, xattrs, hard links (``imgbase verify`` proves it).

With ``--mount``, the squashfs IMAGE_FILE and the base's BASE_DEVICE are mounted at the
two directories first and unmounted after, whatever happens: one step of the update
instead of three, each with its own process and journal records.

The listing comes with the image: a path in it that could lead out of the base
(absolute, ``..``, a NUL) refuses the sync, and a removal never follows a symlink
(:mod:`imgbase.intree`).

Imports only imgbase.image.filelist, .intree, .run and .errors, and those lazily where they can: it
runs as its own process in an update, where every import costs under emulation.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import TYPE_CHECKING

from ..errors import ImgbaseError
from ..image.filelist import LISTING, diff, read_listing
from ..intree import Dirs, NotInside, parts
from ..run import run

# --whole-file: a listed file is copied whole, not matched block by block -- an updated
# package's files are new through and through (measured in a guest: 91 changed files,
# 1.7 MB, 0.7 s instead of 1.4 s). --inplace: written into
# the snapshot's file, not a temporary beside it.
if TYPE_CHECKING:
    from pathlib import Path

RSYNC = ("rsync", "-aHAXS", "--numeric-ids", "--inplace", "--whole-file")


def _remove(dirs: Dirs, rel: str) -> None:
    """Remove base's rel, found through real directories only: a path under a symlink
    of the base is not in the base, and nothing is removed through the link."""
    parent, _, name = rel.rpartition("/")
    try:
        dfd = dirs.get(parent)
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except (NotInside, FileNotFoundError):
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil

        dirs.forget(rel)
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def checked(paths: list[str], image: str) -> list[str]:
    """The listing's paths, each refused if it could lead out of the tree: absolute,
    with a '..' component, or a NUL (it would split rsync's list). A newline is a file
    name's right: it reaches rsync NUL-separated, and a listing line holds it escaped."""
    for rel in paths:
        if rel != ".":
            try:
                parts(rel)
            except NotInside as exc:
                raise ImgbaseError(f"the file listing of {image} is not to be trusted: "
                                   f"{exc.message}",
                                   hint=f"{LISTING} of a composed image lists relative "
                                   "paths only; recompose the image") from exc
    return paths


def sync(image: str | Path, base: str | Path) -> str:
    """Make base equal image; return how ("delta: N paths" or "whole tree")."""
    image, base = os.fspath(image), os.fspath(base)
    old, new = read_listing(base), read_listing(image)
    if old is None or new is None:
        # --checksum: rsync's quick check (size and mtime) misses a file changed in
        # place, and with mtimes clamped to SOURCE_DATE_EPOCH that is not rare
        run([*RSYNC, "--delete", "--checksum", f"{image}/", f"{base}/"])
        return "whole tree (no file listing on " + ("both sides)" if old is new else
                                                    "one side)")
    d = diff(old, new)
    transfer, remove = checked(d.transfer, image), checked(d.remove, image)
    with Dirs(base) as dirs:
        for rel in remove:
            _remove(dirs, rel)
    paths = [*transfer, LISTING]
    # --ignore-times: a listed file can differ in content with the same size and mtime.
    # The list goes through stdin, names that are not UTF-8 as the bytes they are.
    run([*RSYNC, "--ignore-times", "--from0", "--files-from=-", f"{image}/", f"{base}/"],
        input="\0".join(paths) + "\0", errors="surrogateescape")
    return f"delta: {len(transfer)} paths copied, {len(remove)} removed"


def mounted_sync(image_file: str, base_dev: str, image: str, base: str) -> str:
    """sync() with the image and the base mounted for it, and unmounted after."""
    os.makedirs(image, exist_ok=True)
    os.makedirs(base, exist_ok=True)
    run(["mount", base_dev, base])
    try:
        run(["mount", "-t", "squashfs", "-o", "loop,ro", image_file, image])
        try:
            return sync(image, base)
        finally:
            run(["umount", image])
    finally:
        run(["umount", base])


USAGE = ("usage: python3 -m imgbase.node.treesync IMAGE_DIR BASE_DIR "
         "[--mount IMAGE_FILE BASE_DEVICE]")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) == 5 and args[2] == "--mount":
            print(mounted_sync(args[3], args[4], args[0], args[1]))
        elif len(args) == 2 and all(os.path.isdir(a) for a in args):
            print(sync(args[0], args[1]))
        else:
            print(USAGE + " (two directories)", file=sys.stderr)
            return 2
    except ImgbaseError as exc:
        print(exc.oneline(), file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
