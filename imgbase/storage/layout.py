"""The node's storage layout: bases, layers and volumes in a tagged thin pool.

:class:`NodeLayout` reads it (``lvs`` JSON, by tag, never by fixed names); the
``*_steps`` functions are pure and return the steps that change it, for the
planners of install, layout --init, base/layer and recover.

An LV being made carries ``imgbase:incomplete`` until its last step, so that an
operation cut short leaves a mark ``imgbase recover`` can find. Volumes carry
their mount point as a tag (``imgbase:mount=/var/log``), which makes the volume
set self-describing: every new layer's fstab is written from it.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import die
from ..image import squashfs
from ..image.naming import Layer, Nvr, layer_key
from ..plan import Step
from . import lvm
from .lvm import TAG_BASE, TAG_LAYER, TAG_POOL, TAG_VG, TAG_VOLUME, LogicalVolume

TAG_INCOMPLETE = "imgbase:incomplete"
TAG_RETIRED = "imgbase:retired"
MOUNT_TAG = "imgbase:mount="
THIN_PROFILE = "imgbase-thin"  # /etc/lvm/profile/imgbase-thin.profile: pool autoextend
WORK = Path("/run/imgbase/work")


def mountpoint_of(lv: LogicalVolume) -> str | None:
    """The mount point a volume carries in its tags.

    >>> lv = LogicalVolume("var_log", "vg", "Vwi-aotz--", 1, "pool", "",
    ...                    frozenset({"imgbase:volume", "imgbase:mount=/var/log"}), None, None)
    >>> mountpoint_of(lv)
    '/var/log'
    """
    return next((t.removeprefix(MOUNT_TAG) for t in lv.tags if t.startswith(MOUNT_TAG)), None)




def require_lvm() -> None:
    """Off a node -- no LVM tools at all -- every node verb says so, in the admin's words."""
    if shutil.which("vgs") is None:
        die("this machine is not an imgbase node (it has no LVM tools)",
            hint="run this on a node; a node is made by imgbase install or imgbase layout "
            "--init")


@dataclass(frozen=True)
class NodeLayout:
    vg: str
    lvs: tuple[LogicalVolume, ...]
    vg_free: int

    @classmethod
    def discover(cls) -> NodeLayout:
        require_lvm()
        found = lvm.vg_free_with_tag(TAG_VG)
        vgs = list(found)
        if not vgs:
            die("this machine is not an imgbase node (no volume group tagged imgbase:vg)",
                hint="install one with imgbase install, or adopt one with imgbase layout --init")
        if len(vgs) > 1:
            die(f"more than one volume group is tagged {TAG_VG}: {', '.join(vgs)}",
                hint=f"remove the tag from the stray one: vgchange --deltag {TAG_VG} VG")
        vg = vgs[0]
        return cls(vg, tuple(lvm.lvs(vg)), found[vg])

    def tagged(self, tag: str) -> list[LogicalVolume]:
        return [lv for lv in self.lvs if tag in lv.tags]

    @property
    def pool(self) -> LogicalVolume | None:
        pools = [lv for lv in self.tagged(TAG_POOL) if lv.is_thin_pool]
        return pools[0] if pools else None

    @property
    def bases(self) -> list[LogicalVolume]:
        return sorted(self.tagged(TAG_BASE), key=lambda lv: layer_key(f"{lv.name}+0"))

    @property
    def layers(self) -> list[LogicalVolume]:
        """Layers whose name parses as <nvr>+<n> (see :attr:`stray_layers`)."""
        return sorted((lv for lv in self.tagged(TAG_LAYER) if layer_key(lv.name)[0] == 0),
                      key=lambda lv: layer_key(lv.name))

    @property
    def stray_layers(self) -> list[LogicalVolume]:
        """LVs tagged as layers whose name is not a layer name."""
        return [lv for lv in self.tagged(TAG_LAYER) if layer_key(lv.name)[0] != 0]

    @property
    def volumes(self) -> list[LogicalVolume]:
        return self.tagged(TAG_VOLUME)

    def get(self, name: str) -> LogicalVolume | None:
        return next((lv for lv in self.lvs if lv.name == name), None)

    def layers_of(self, base: str) -> list[LogicalVolume]:
        return [lv for lv in self.layers if lv.origin == base]

    def next_layer(self, base: str) -> str:
        """Name of the next layer of base: one past the highest index ever in use."""
        nvr = Nvr.parse(base)
        used = [Layer.parse(lv.name).index for lv in self.lvs
                if lv.name.startswith(f"{base}+") and layer_key(lv.name)[0] == 0]
        return str(Layer(nvr, max(used, default=0) + 1))


# -- steps -------------------------------------------------------------------------------

def fsck_step(name: str, dev: str) -> Step:
    """e2fsck -fy, where 1 (errors corrected, e.g. a replayed journal) is success."""
    return Step(name, ("sh", "-c", 'e2fsck -fy "$1"; test $? -le 1', "e2fsck", dev))


# ext4 on a thin LV. nodiscard: the LV is fresh, nothing to discard. lazy_itable_init=0:
# by default mkfs leaves the inode tables to the kernel, which zeroes them in the
# background after the first read-write mount -- of every layer, since a read-only base
# never gets that far: ~128 MiB of pool per layer of an 8 GiB base, for nothing.
MKFS_THIN = ("mkfs.ext4", "-q", "-E", "nodiscard,lazy_itable_init=0")


def base_from_image_steps(vg: str, nvr: str, image: str, size: str, mnt: Path,
                          pool: str = "pool") -> list[Step]:
    """A new base LV holding the squashfs image, left read-only and inactive."""
    dev = f"/dev/{vg}/{nvr}"
    return [
        Step("base-create", ("lvcreate", "-y", "-V", size, "-T", f"{vg}/{pool}", "-n", nvr,
                             "--addtag", TAG_BASE, "--addtag", TAG_INCOMPLETE)),
        Step("base-mkfs", MKFS_THIN + (dev,),
             note="inode tables written now, once, and shared by every layer of the base"),
        Step("base-mount", ("sh", "-c", 'mkdir -p "$2" && mount "$1" "$2"', "mount", dev,
                            str(mnt))),
        Step("base-unpack", squashfs.unpack_argv(image, mnt, force=True)),
        Step("base-umount", ("umount", str(mnt))),
        *base_seal_steps(vg, nvr),
    ]


def base_from_lv_steps(vg: str, nvr: str, origin: str) -> list[Step]:
    """A new base LV as a thin snapshot of an existing root LV (layout --init)."""
    dev = f"/dev/{vg}/{nvr}"
    return [
        Step("base-snapshot", ("lvcreate", "-y", "-s", "-kn", "--addtag", TAG_BASE,
                               "--addtag", TAG_INCOMPLETE, "-n", nvr, f"{vg}/{origin}"),
             note="the device is suspended (and its filesystem frozen) for the snapshot; "
                  "-kn: created active"),
        fsck_step("base-fsck", dev),
        *base_seal_steps(vg, nvr),
    ]


def base_seal_steps(vg: str, nvr: str) -> list[Step]:
    """Deactivate, then in one metadata commit: read-only, skipped at activation, complete."""
    return [
        Step("base-deactivate", ("lvchange", "-an", f"{vg}/{nvr}")),
        Step("base-complete", ("lvchange", "-y", "--permission", "r", "--setactivationskip", "y",
                               "--deltag", TAG_INCOMPLETE, f"{vg}/{nvr}"),
             note="read-only and complete at once (one LVM metadata commit)"),
    ]


def layer_create_steps(vg: str, base: str, layer: str, mnt: Path, fstab: str) -> list[Step]:
    """A writable thin snapshot of base with a fresh filesystem UUID, mounted at mnt."""
    dev = f"/dev/{vg}/{layer}"
    return [
        Step("layer-create", ("lvcreate", "-y", "-s", "-kn", "-prw", "--addtag", TAG_LAYER,
                              "--addtag", TAG_INCOMPLETE, "-n", layer, f"{vg}/{base}"),
             note="-kn: no activation skip, so the snapshot is created active"),
        fsck_step("layer-fsck", dev),
        Step("layer-uuid", ("tune2fs", "-U", "random", dev),
             note="a fresh filesystem UUID for each layer"),
        Step("layer-mount", ("sh", "-c", 'mkdir -p "$2" && mount -o discard "$1" "$2"',
                             "mount", dev, str(mnt))),
        Step("layer-fstab", write=(f"{mnt}/etc/fstab", fstab)),
    ]


def layer_finish_steps(vg: str, layer: str, mnt: Path) -> list[Step]:
    return [
        Step("layer-umount", ("umount", str(mnt))),
        Step("layer-complete", ("lvchange", "--deltag", TAG_INCOMPLETE, f"{vg}/{layer}")),
    ]


def volume_steps(vg: str, lv: str, mountpoint: str, size: str, source: Path | None,
                 mnt: Path, pool: str = "pool") -> list[Step]:
    """A thin volume for mountpoint, filled from source (the layer's copy) if given."""
    dev = f"/dev/{vg}/{lv}"
    steps = [
        Step(f"volume-{lv}", ("lvcreate", "-y", "-V", size, "-T", f"{vg}/{pool}", "-n", lv,
                              "--addtag", TAG_VOLUME, "--addtag", f"{MOUNT_TAG}{mountpoint}",
                              "--addtag", TAG_INCOMPLETE)),
        Step(f"mkfs-{lv}", MKFS_THIN + (dev,)),
    ]
    if source is not None:
        steps.append(Step(f"fill-{lv}", (
            # the volume's root takes the mode and owner of the directory it replaces
            # (/tmp and /var/tmp are 1777), then its contents
            "sh", "-c", 'mkdir -p "$2" && mount "$1" "$2" && { [ ! -d "$3" ] || '
            '{ chmod --reference="$3" "$2" && chown --reference="$3" "$2" && '
            'cp -a "$3/." "$2/"; }; }; s=$?; umount "$2"; exit $s', "fill", dev, str(mnt),
            str(source))))
    steps.append(Step(f"volume-{lv}-complete", ("lvchange", "--deltag", TAG_INCOMPLETE,
                                                f"{vg}/{lv}")))
    return steps


def rewrite_fstab(old: str, root: str, volumes: Sequence[tuple[str, str]]) -> str:
    """The fstab of a layer: / on root, one line per (mountpoint, device) volume.

    Lines for other mount points (/boot, swap) and comments are kept.

    >>> old = "# made by anaconda\\n/dev/mapper/vg-root / ext4 defaults 1 1\\n" \\
    ...       "UUID=ab /boot ext4 defaults 1 2\\n/dev/vg/old /var ext4 defaults 0 0\\n"
    >>> print(rewrite_fstab(old, "/dev/vg/n-1-1+1",
    ...       [("/var/log", "/dev/vg/var_log"), ("/var", "/dev/vg/var")]), end="")
    /dev/vg/n-1-1+1 / ext4 defaults,discard 0 1
    # made by anaconda
    UUID=ab /boot ext4 defaults 1 2
    /dev/vg/var /var ext4 defaults,discard 0 2
    /dev/vg/var_log /var/log ext4 defaults,discard 0 2
    """
    managed = {"/", *(mp for mp, _ in volumes)}
    keep = [line for line in old.splitlines()
            if not (len(line.split()) > 1 and not line.lstrip().startswith("#")
                    and line.split()[1] in managed)]
    lines = [f"{root} / ext4 defaults,discard 0 1", *keep]
    for mp, dev in sorted(volumes, key=lambda v: (v[0].count("/"), v[0])):
        lines.append(f"{dev} {mp} ext4 defaults,discard 0 2")
    return "\n".join(lines) + "\n"
