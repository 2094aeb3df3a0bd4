"""The node as its planners and checks see it: the layout, the booted layer, grubenv and
the boot menu, and whether /boot is mounted (:class:`NodeFacts`, gathered once per verb)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import bootloader
from ..bootloader import efi
from ..errors import ImgbaseError, die
from ..image.naming import Nvr
from ..run import run
from ..storage.layout import NodeLayout

BOOT = Path("/boot")
FSTAB = Path("/etc/fstab")


def boot_unmounted(fstab: str, boot: Path, mounted: bool) -> str | None:
    """Why /boot must not be written: fstab mounts a filesystem there and none is
    (what is there is the root's own directory, which GRUB never reads).

    >>> boot_unmounted("LABEL=boot /boot ext4 defaults 0 2\\n", Path("/boot"), False)
    '/boot is not mounted (/etc/fstab mounts LABEL=boot there)'
    >>> boot_unmounted("LABEL=boot /boot ext4 defaults 0 2\\n", Path("/boot"), True)
    >>> boot_unmounted("/dev/vg/a+1 / ext4 defaults 0 1\\n", Path("/boot"), False)
    """
    if mounted:
        return None
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") \
                and os.path.normpath(fields[1]) == os.path.normpath(boot):
            return f"{boot} is not mounted ({FSTAB} mounts {fields[0]} there)"
    return None


def named_dirs(boot: Path, parse: Callable[[str], object]) -> tuple[str, ...]:
    """Directories in /boot whose names parse: a layer's kernel (``Layer.parse``), a base's
    rescue kernel (:func:`base_name`)."""
    found = []
    for p in sorted(boot.iterdir()) if boot.is_dir() else []:
        if p.is_dir() and not p.is_symlink():
            try:
                parse(p.name)
            except ImgbaseError:
                continue
            found.append(p.name)
    return tuple(found)


def base_name(name: str) -> Nvr:
    """An NVR that is not a layer's name."""
    if "+" in name:
        die(f"{name} is a layer's name", hint="a base is <nvr>")
    return Nvr.parse(name)


def rescued_base(cmdline: str, layout: NodeLayout) -> str | None:
    """The base a rescue entry booted (``imgbase.rescue root=/dev/VG/BASE``), else None.

    >>> from imgbase.storage.lvm import LogicalVolume
    >>> base = LogicalVolume("n-1-1", "vg", "Vri---tz-k", 1, "pool", "",
    ...                      frozenset({"imgbase:base"}), None, None)
    >>> rescued_base("root=/dev/vg/n-1-1 ro imgbase.rescue", NodeLayout("vg", (base,), 0))
    'n-1-1'
    >>> rescued_base("root=/dev/vg/n-1-1 ro", NodeLayout("vg", (base,), 0))
    """
    words = cmdline.split()
    if "imgbase.rescue" not in words:
        return None
    root = next((w.removeprefix("root=") for w in words if w.startswith("root=")), "")
    return next((lv.name for lv in layout.bases if root == f"/dev/{layout.vg}/{lv.name}"),
                None)


@dataclass(frozen=True)
class NodeFacts:
    """What the node's planners and checks need: the layout and the boot state."""

    layout: NodeLayout
    booted: str | None  # the layer mounted as /
    env: dict[str, str]  # grubenv
    entries: dict[str, str]  # grub menu entries by id
    boot: Path = BOOT
    unmounted: str | None = None  # /boot should be a mount of its own and is not: why
    menu_problem: str | None = None  # why the menu may not be what GRUB reads (None: it is)
    #: /boot's filesystem UUID when imgbase's ESP is mounted at /boot/efi (its grub.cfg
    #: finds /boot by it); None: no ESP, or another system's: nothing on it is written
    esp_boot_uuid: str | None = None
    boot_uuid: str | None = None  # /boot's filesystem UUID when it is mounted
    #: the bases with a rescue entry GRUB reads: in the rescue menu, their own kernel and
    #: initrd in /boot/<base>/
    rescue: tuple[str, ...] = ()
    rescued: str | None = None  # the base this boot runs from as a rescue system
    #: GRUB reads the rescue menu: grub.cfg sources it (not a BLS /boot, nor a grub.cfg
    #: older than rescue entries: those get none)
    rescue_menu: bool = False
    #: directories in /boot named like a base (NVR, no "+"): rescue kernels, or their remains
    base_dirs: tuple[str, ...] = ()

    @classmethod
    def gather(cls, boot: Path = BOOT, layout: NodeLayout | None = None,
               fstab: Path = FSTAB) -> NodeFacts:
        layout = layout or NodeLayout.discover()
        root = os.path.realpath(run(["findmnt", "-n", "-o", "SOURCE", "/"]).stdout.strip())
        booted = next((lv.name for lv in layout.layers
                       if lv.active and os.path.realpath(lv.path) == root), None)
        entries, problem = bootloader.read_menu(boot)
        unmounted = boot_unmounted(fstab.read_text() if fstab.is_file() else "", boot,
                                   os.path.ismount(boot))
        boot_uuid = None
        if os.path.ismount(boot):
            boot_uuid = run(["findmnt", "-n", "-o", "UUID", str(boot)]).stdout.strip() or None
        esp_uuid = (boot_uuid if os.path.ismount(boot / "efi") and efi.ours(boot / "efi")
                    else None)
        rescue_menu, in_menu = bootloader.read_rescue_menu(boot)
        rescue = tuple(lv.name for lv in layout.bases
                       if lv.name in in_menu and (boot / lv.name / "vmlinuz").is_file()
                       and (boot / lv.name / "initrd.img").is_file())
        return cls(layout, booted, bootloader.read_grubenv(boot / "grub/grubenv"),
                   entries, boot, unmounted, problem, esp_uuid, boot_uuid, rescue,
                   rescued_base(Path("/proc/cmdline").read_text(), layout), rescue_menu,
                   named_dirs(boot, base_name))

    def need_boot(self) -> None:
        """Refuse (a verb that writes /boot) when /boot is not mounted: the write would land
        in the root's directory, and GRUB would never see it."""
        if self.unmounted:
            die(self.unmounted, hint=f"mount {self.boot}, then run this again")

    def need_menu(self) -> None:
        """Refuse (a planner that removes what the menu does not name) unless /boot is
        mounted and its menu reads as imgbase wrote it."""
        self.need_boot()
        if self.menu_problem:
            die(f"cannot read the boot menu: {self.menu_problem}",
                hint="nothing was removed; imgbase check and imgbase boot show the menu; "
                     "repair it (imgbase kargs, boot --set-default), then run this again")

    @property
    def default(self) -> str | None:
        return self.env.get("saved_entry") or None

    @property
    def booted_base(self) -> str | None:
        lv = self.layout.get(self.booted) if self.booted else None
        return lv.origin if lv else None
