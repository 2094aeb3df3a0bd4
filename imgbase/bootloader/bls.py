"""Boot Loader Spec entries, for Fedora-style GRUB with blscfg (``/boot/loader/entries``).

One file per layer, ``<layer>.conf`` (so the BLS id, which grubenv's ``saved_entry``
names, is the layer name), marked by its first line ``# imgbase-layer <layer>``. Files
without that marker are someone else's: read past, never changed or deleted.

Contract-tested only (tests/unit/test_bls.py): no Fedora GRUB boots here. The boot
counter of grub.cfg is the Debian menu's; on a BLS system the counting would have to
come from a grub.d snippet, which is not written yet.

>>> text = render("n-1-1+1", "/dev/vg/n-1-1+1", "rw quiet")
>>> print(text, end="")
# imgbase-layer n-1-1+1
title imgbase n-1-1+1
version n-1-1+1
linux /n-1-1+1/vmlinuz
initrd /n-1-1+1/initrd.img
options root=/dev/vg/n-1-1+1 rw quiet
grub_class imgbase
>>> layer_of(text)
'n-1-1+1'
"""

from __future__ import annotations

from pathlib import Path

from ..errors import die
from ..image.kargs import UNSAFE, cmdline
from ..plan import Step

ENTRIES_DIR = "loader/entries"
MARKER = "# imgbase-layer "


def render(layer: str, root: str, kargs: str) -> str:
    """blscfg expands ``options`` as GRUB script: its words are checked as a GRUB entry's."""
    if not layer or UNSAFE.search(layer):
        die(f"layer name {layer!r} cannot go into a boot entry", hint="a layer is <nvr>+<n>")
    return (f"{MARKER}{layer}\ntitle imgbase {layer}\nversion {layer}\n"
            f"linux /{layer}/vmlinuz\ninitrd /{layer}/initrd.img\n"
            f"options {cmdline(root, kargs)}\ngrub_class imgbase\n")


def layer_of(text: str) -> str | None:
    first = text.split("\n", 1)[0]
    return first.removeprefix(MARKER).strip() if first.startswith(MARKER) else None


def read(boot: Path) -> dict[str, str]:
    """imgbase's entries by layer; an entry counts only if its file is named for its marker."""
    found = {}
    for path in sorted((boot / ENTRIES_DIR).glob("*.conf")):
        text = path.read_text(errors="replace")
        layer = layer_of(text)
        if layer is not None and path.name == f"{layer}.conf":
            found[layer] = text
    return found


def write_steps(boot: Path, changes: dict[str, str | None]) -> list[Step]:
    """Write (or, for None, remove) the entry files of the changed layers only."""
    steps = []
    for layer, text in changes.items():
        path = boot / ENTRIES_DIR / f"{layer}.conf"
        if text is None:
            steps.append(Step("boot-entries", ("rm", "-f", str(path))))
        else:
            steps.append(Step("boot-entries", write=(str(path), text)))
    return steps
