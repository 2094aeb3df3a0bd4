"""The EFI system partition: the Secure Boot chain the firmware starts, from the image.

UEFI firmware runs Microsoft-signed shim, shim runs Debian-signed grub (its modules built
in: nothing is loaded from disk), grub's ``linux`` has shim check the Debian-signed kernel.
The ESP (FAT, partition 2, mounted at ``/boot/efi``) holds that chain twice: under
``EFI/debian/`` (where the ``efibootmgr`` entry points) and under the removable-media path
``EFI/BOOT/BOOTX64.EFI``, which firmware boots when its NVRAM has no entry (reset, or a
disk moved to another server). Next to each grub a three-line ``grub.cfg`` finds /boot by
its filesystem UUID and hands over to the one menu BIOS boots too (``/boot/grub/grub.cfg``),
so default, next-entry, boot counting and fallback are the same code on every firmware.

Every file is taken from a layer's tree (the image), never from the host. A file is
replaced by writing ``NAME.new``, syncing it, then renaming it over ``NAME``: a power cut
leaves the old file or the new one, and shim before grub would never run a half file.

>>> print(stub_cfg("0b2e5c59-57a2-4f4d-9b0a-3b7a5b6b1d1c"), end="")
# imgbase: /boot is found by its UUID; its grub.cfg is the menu
search --no-floppy --fs-uuid --set=root 0b2e5c59-57a2-4f4d-9b0a-3b7a5b6b1d1c
set prefix=($root)/grub
configfile $prefix/grub.cfg
>>> stub_cfg("x; reboot")
Traceback (most recent call last):
...
imgbase.errors.InputError: '/boot' filesystem UUID 'x; reboot' is not a UUID
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..errors import die
from ..plan import Step

MOUNTPOINT = "/boot/efi"
VENDOR = "EFI/debian"
REMOVABLE = "EFI/BOOT"
#: where each boot file comes from in a layer's tree
SOURCES = {
    "shim": "usr/lib/shim/shimx64.efi.signed",
    "grub": "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
    "mok": "usr/lib/shim/mmx64.efi.signed",
}
#: ESP path -> source; grub before shim: a cut in between leaves the old shim starting a
#: grub that Debian signed, never a shim whose grub is missing
FILES = {
    f"{VENDOR}/grubx64.efi": "grub", f"{VENDOR}/mmx64.efi": "mok",
    f"{VENDOR}/shimx64.efi": "shim",
    f"{REMOVABLE}/grubx64.efi": "grub", f"{REMOVABLE}/mmx64.efi": "mok",
    f"{REMOVABLE}/BOOTX64.EFI": "shim",
}
STUBS = (f"{VENDOR}/grub.cfg", f"{REMOVABLE}/grub.cfg")
LOADER = "\\EFI\\debian\\shimx64.efi"  # the efibootmgr entry's loader
LABEL = "imgbase"
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
VOLUME_ID_RE = re.compile(r"[0-9A-F]{8}")
# unless it is the same already: copy, sync the copy, rename it over the old file (the old
# file or the new, never half), then sync the filesystem, so that the renames reach the
# disk in the order of the steps (grub before shim)
REPLACE = ('cmp -s "$1" "$2" || { cp "$1" "$2.new" && sync "$2.new" && mv -f "$2.new" "$2" '
           '&& sync -f "$2"; }')


def stub_cfg(boot_uuid: str) -> str:
    """The grub.cfg next to the signed grub on the ESP."""
    if not UUID_RE.fullmatch(boot_uuid):
        die(f"'/boot' filesystem UUID {boot_uuid!r} is not a UUID",
            hint="blkid -s UUID -o value on /boot's device gives it")
    return ("# imgbase: /boot is found by its UUID; its grub.cfg is the menu\n"
            f"search --no-floppy --fs-uuid --set=root {boot_uuid}\n"
            "set prefix=($root)/grub\nconfigfile $prefix/grub.cfg\n")


def fstab_line(volume_id: str) -> str:
    """/boot/efi in fstab: by its FAT volume id (XXXX-XXXX); nofail, so a damaged ESP does
    not stop a booted node (imgbase check reports it).

    >>> fstab_line("0A1B2C3D")
    'UUID=0A1B-2C3D /boot/efi vfat umask=0077,nofail 0 1'
    """
    if not VOLUME_ID_RE.fullmatch(volume_id):
        die(f"FAT volume id {volume_id!r} is not 8 hex digits", hint="e.g. 0A1B2C3D")
    return f"UUID={volume_id[:4]}-{volume_id[4:]} {MOUNTPOINT} vfat umask=0077,nofail 0 1"


def missing_sources(tree: Path) -> list[str]:
    """The boot files a layer's tree lacks for UEFI (an image without shim-signed and
    grub-efi-amd64-signed boots under BIOS only)."""
    return [rel for rel in SOURCES.values() if not (tree / rel).is_file()]


def image_has_chain(image: str) -> bool:
    """The (verified) image's squashfs carries shim and the signed grub."""
    from ..image import squashfs

    names = set(squashfs.names(image, "usr/lib/shim")) | set(
        squashfs.names(image, "usr/lib/grub/x86_64-efi-signed"))
    return all(f"/{rel}" in names for rel in SOURCES.values())


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def stale(esp: Path, tree: Path) -> list[str]:
    """ESP files that are missing or differ from the tree's (in FILES order)."""
    return [rel for rel, src in FILES.items()
            if digest(esp / rel) != digest(tree / SOURCES[src])]


#: what imgbase last wrote to the ESP: "# <nvr>" then sha256sum lines of FILES, written
#: after the files (so a record names only a chain that is whole)
RECORD = f"{VENDOR}/imgbase-chain"
WRITE_RECORD = ('d="$1"; nvr="$2"; shift 2; cd "$d" && { printf "# %s\\n" "$nvr" && '
                'sha256sum -- "$@"; } > "$0.new" && sync "$0.new" && mv -f "$0.new" "$0" '
                '&& sync -f .')


def read_record(esp: Path) -> tuple[str | None, dict[str, str]]:
    """The image the ESP's chain came from, and the digest of each file as written."""
    text = read_text(esp / RECORD) or ""
    lines = text.splitlines()
    nvr = lines[0][2:] if lines and lines[0].startswith("# ") else None
    digests = {}
    for line in lines[1:]:
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[1] in FILES:
            digests[parts[1]] = parts[0]
    return nvr, digests


def ours(esp: Path) -> bool:
    """An ESP imgbase wrote (its record or one of its grub.cfg stubs is there); another
    system's ESP is never written."""
    return (esp / RECORD).is_file() or any(
        (read_text(esp / rel) or "").startswith("# imgbase:") for rel in STUBS)


def damaged(esp: Path) -> list[str]:
    """ESP files missing, or not what the record says was written (a torn or foreign write)."""
    _, recorded = read_record(esp)
    return [rel for rel in FILES if digest(esp / rel) is None
            or digest(esp / rel) != recorded.get(rel)]


def repair(esp: Path, tree: Path, boot_uuid: str) -> tuple[str, ...] | None:
    """What recover rewrites from `tree` (the booted image): the damaged files and the
    stubs, or None when nothing is wrong or the tree has no chain to copy. A whole chain
    that another (newer) image wrote is never replaced: that would be a downgrade, which
    Secure Boot's SBAT may then refuse."""
    if missing_sources(tree):
        return None
    files = tuple(damaged(esp))
    want = stub_cfg(boot_uuid)
    if not files and all(read_text(esp / rel) == want for rel in STUBS):
        return None
    return files


def sync_steps(esp: Path, tree: Path, boot_uuid: str, nvr: str,
               files: list[str] | None = None) -> list[Step]:
    """Steps that make the ESP boot the chain of `tree` (image nvr): each file of `files`
    (default all) replaced atomically, the grub.cfg stubs, the record, a sync."""
    stubs = stub_cfg(boot_uuid)
    steps = [Step("esp-dirs", ("mkdir", "-p", str(esp / VENDOR), str(esp / REMOVABLE)))]
    for rel in (FILES if files is None else files):
        steps.append(Step(f"esp-{rel.lower().replace('/', '-')}",
                          ("sh", "-c", REPLACE, "esp-replace", str(tree / SOURCES[FILES[rel]]),
                           str(esp / rel))))
    steps += [Step(f"esp-{rel.lower().replace('/', '-')}", write=(str(esp / rel), stubs))
              for rel in STUBS]
    steps.append(Step("esp-record", ("sh", "-c", WRITE_RECORD, RECORD, str(esp), nvr,
                                     *FILES)))
    return steps


# the old entries labelled imgbase go (a reinstall must not pile them up), then a new one
# first in BootOrder; a firmware that refuses leaves a warning, not a failed install: the
# removable-media path boots the disk anyway
BOOT_ENTRY = (
    'efibootmgr | sed -n "s/^Boot\\([0-9A-Fa-f]\\{4\\}\\)\\* $3\\([[:space:]].*\\)\\?$/\\1/p" | '
    'while read -r n; do efibootmgr -q -b "$n" -B; done; '
    'efibootmgr -q --create --disk "$1" --part "$2" --label "$3" --loader "$4" || '
    'echo "imgbase: warning: no NVRAM boot entry (efibootmgr failed); the disk boots by '
    'the removable-media path" >&2')


def boot_entry_step(disk: str, part: int) -> Step:
    """An NVRAM boot entry for the shim on the ESP, put first in BootOrder."""
    return Step("efi-boot-entry", ("sh", "-c", BOOT_ENTRY, "efi-boot-entry", disk, str(part),
                                   LABEL, LOADER))
