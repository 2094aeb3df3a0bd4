"""Make a tree (a base being made) equal to a mounted image: only what changed is written.

    python3 -P -m imgbase.treesync IMAGE_DIR BASE_DIR

When both trees carry a file listing (:mod:`imgbase.filelist`), the two listings are
compared, paths gone or changed in kind are removed, and rsync copies just the paths
that differ (``--files-from``, every one compared block by block, so only changed
blocks are written to the thin snapshot). Without a listing on either side it is rsync
over the whole tree, comparing every file's contents (``--checksum``). Both end with
BASE_DIR holding exactly IMAGE_DIR: contents, modes, owners, mtimes, xattrs, hard links
(``imgbase verify`` proves it).

Imports only imgbase.filelist, .run and .errors: it runs as its own process in an
update, where importing the CLI would cost seconds under emulation.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import ImgbaseError
from .filelist import LISTING, diff, read_listing
from .run import run

RSYNC = ("rsync", "-aHAXS", "--numeric-ids", "--inplace", "--no-whole-file")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def sync(image: Path, base: Path) -> str:
    """Make base equal image; return how ("delta: N paths" or "whole tree")."""
    old, new = read_listing(base), read_listing(image)
    if old is None or new is None:
        # --checksum: rsync's quick check (size and mtime) misses a file changed in
        # place, and with mtimes clamped to SOURCE_DATE_EPOCH that is not rare
        run([*RSYNC, "--delete", "--checksum", f"{image}/", f"{base}/"])
        return "whole tree (no file listing on " + ("both sides)" if old is new else
                                                    "one side)")
    d = diff(old, new)
    for rel in d.remove:
        _remove(base / rel)
    paths = [*d.transfer, LISTING]
    with tempfile.NamedTemporaryFile("wb", prefix="treesync.", suffix=".list") as f:
        f.write(b"\0".join(os.fsencode(p) for p in paths) + b"\0")
        f.flush()
        # --ignore-times: a listed file can differ in content with the same size and mtime
        run([*RSYNC, "--ignore-times", "--from0", f"--files-from={f.name}",
                f"{image}/", f"{base}/"])
    return f"delta: {len(d.transfer)} paths copied, {len(d.remove)} removed"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not all(os.path.isdir(a) for a in args):
        print("usage: python3 -m imgbase.treesync IMAGE_DIR BASE_DIR (two directories)",
              file=sys.stderr)
        return 2
    try:
        print(sync(Path(args[0]), Path(args[1])))
    except ImgbaseError as exc:
        print(exc.oneline(), file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
