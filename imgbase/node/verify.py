"""`imgbase verify BASE IMAGE`: prove a base holds exactly its image, byte for byte.

Read-only: the base is activated (it skips activation otherwise) and mounted
read-only, the image loop-mounted, and ``rsync --checksum --dry-run --itemize-changes``
lists every file whose content, mode, owner, links, ACLs or xattrs differ, and every
file one side has and the other does not. Empty list: the base is its image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..errors import die
from ..run import run
from ..storage.layout import WORK
from .facts import NodeFacts


def differences(itemized: str) -> list[str]:
    """Paths rsync's --itemize-changes output names (directory time noise dropped).

    >>> differences(">fc.T...... usr/bin/x\\n.d..t...... usr/\\n*deleting   etc/junk\\n")
    ['usr/bin/x', 'etc/junk']
    """
    out = []
    for line in itemized.splitlines():
        if not line.strip():
            continue
        flags, _, path = line.partition(" ")
        path = path.strip()
        if flags.startswith("*deleting"):
            out.append(path)
        elif flags.startswith(".d") and set(flags[2:]) <= {".", "t"}:
            continue  # a directory whose only difference is its time
        else:
            out.append(path)
    return out


@contextlib.contextmanager
def _mounted(vg: str, base: str, image: str) -> Iterator[tuple[Path, Path]]:
    base_mnt, img_mnt = WORK / "verify-base", WORK / "verify-image"
    base_mnt.mkdir(parents=True, exist_ok=True)
    img_mnt.mkdir(parents=True, exist_ok=True)
    run(["lvchange", "-ay", "-K", f"{vg}/{base}"])
    try:
        run(["mount", "-o", "ro,noload", f"/dev/{vg}/{base}", str(base_mnt)])
        try:
            run(["mount", "-t", "squashfs", "-o", "loop,ro", image, str(img_mnt)])
            try:
                yield base_mnt, img_mnt
            finally:
                run(["umount", str(img_mnt)])
        finally:
            run(["umount", str(base_mnt)])
    finally:
        run(["lvchange", "-an", f"{vg}/{base}"], check=False)


def verify(base: str, image: str) -> list[str]:
    facts = NodeFacts.gather()
    if facts.layout.get(base) not in facts.layout.bases:
        die(f"{base} is not a base of this node", hint="imgbase base --list names them")
    if not Path(image).exists():
        die(f"{image}: no such image", hint="give the .squashfs the base was made from")
    with _mounted(facts.layout.vg, base, image) as (base_mnt, img_mnt):
        # lost+found: the base filesystem's own directory (mkfs made it), not image content
        out = run(["rsync", "-aHAXn", "--checksum", "--delete", "--numeric-ids",
                   "--exclude=/lost+found",
                   "--itemize-changes", f"{img_mnt}/", f"{base_mnt}/"]).stdout
    return differences(out)
