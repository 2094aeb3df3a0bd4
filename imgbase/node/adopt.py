"""`imgbase layout --init`: adopt an anaconda install into a base and a layer.

What anaconda leaves with ``autopart --type=thinp`` and ``liveimg``: a root LV
in a thin pool holding the image, /boot on a partition (holding the image's
kernel and initrd), perhaps swap. From that, run in the kickstart's ``%post``
(chrooted, so ``--from /``) or from a rescue system (``--from /mnt/sysimage``):

1. remove what an earlier, interrupted attempt left (LVs with imgbase tags in an
   untagged VG), attach the autoextend profile to the pool (found through the root LV);
2. snapshot the root LV into the base ``<nvr>`` (read-only, activation skipped);
3. move /var onto its own thin volume, unless it already is one;
4. snapshot the base into the first layer ``<nvr>+1`` with its fstab;
5. give the layer a grub entry and make it the default;
6. tag the old root LV ``imgbase:retired`` (it is no longer booted; ``imgbase
   recover`` removes it once nothing holds it open), then the pool and, last, the
   VG: until then this is not a node, and running layout --init again is the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cmp_to_key
from pathlib import Path
from typing import Any

from .. import bootloader
from ..errors import die
from ..image.kargs import check_arg, for_new_node
from ..image.naming import Layer, Nvr, vercmp
from ..plan import Plan, Step
from ..run import run
from ..storage import lvm
from ..storage.layout import (
    MOUNT_TAG,
    TAG_RETIRED,
    THIN_PROFILE,
    WORK,
    base_from_lv_steps,
    layer_create_steps,
    layer_finish_steps,
    rewrite_fstab,
    volume_steps,
)
from ..storage.lvm import TAG_BASE, TAG_POOL, TAG_VG, TAG_VOLUME

VAR_SIZE = "4G"
# Not /var/lib/imgbase: /var is being copied onto its own volume while this runs.
JOURNAL = Path("/run/imgbase/layout-init.journal")


@dataclass(frozen=True)
class AdoptFacts:
    root: str  # the tree being adopted, "/" in %post
    vg: str
    pool: str
    root_lv: str
    nvr: str
    kernel: str
    fstab: str
    kernel_args: tuple[str, ...] = ()
    var_lv: str | None = None  # an existing separate /var LV in the VG (tagged, kept)
    leftovers: tuple[str, ...] = ()  # LVs an interrupted attempt made (snapshots first)
    grubenv: dict[str, str] = field(default_factory=dict)  # what anaconda's grubenv holds
    boot_uuid: str | None = None  # filesystem UUID of /boot, for grub's search


def plan_adopt(f: AdoptFacts) -> Plan:
    nvr = str(Nvr.parse(f.nvr))
    layer = str(Layer(Nvr.parse(nvr), 1))
    vg, root = f.vg, Path(f.root)
    boot, mnt = root / "boot", WORK / "adopt"
    steps = [
        *(Step(f"leftover-{lv}", ("lvremove", "-y", f"{vg}/{lv}")) for lv in f.leftovers),
        Step("pool-profile", ("lvchange", "--metadataprofile", THIN_PROFILE, f"{vg}/{f.pool}")),
        Step("sync", ("sync",)),
        *base_from_lv_steps(vg, nvr, f.root_lv),
    ]
    if f.var_lv:
        steps.append(Step("tag-var", ("lvchange", "--addtag", TAG_VOLUME, "--addtag",
                                      f"{MOUNT_TAG}/var", f"{vg}/{f.var_lv}")))
        var_dev = f"/dev/{vg}/{f.var_lv}"
    else:
        steps += volume_steps(vg, "var", "/var", VAR_SIZE, root / "var", WORK / "adopt-var",
                              f.pool)
        var_dev = f"/dev/{vg}/var"
    fstab = rewrite_fstab(f.fstab, f"/dev/{vg}/{layer}", [("/var", var_dev)])
    steps += layer_create_steps(vg, nvr, layer, mnt, fstab)
    kargs = for_new_node(f.kernel_args)
    steps += [
        Step("grub-cfg", write=(str(boot / "grub/grub.cfg"),
                                bootloader.grub_cfg(layer, boot_uuid=f.boot_uuid))),
        *bootloader.add_entry_steps(boot, layer, f"/dev/{vg}/{layer}", kargs,
                                    boot / f"vmlinuz-{f.kernel}",
                                    boot / f"initrd.img-{f.kernel}",
                                    bootloader.read_entries(boot)),
        bootloader.set_default_step(boot, layer, f.grubenv),
        *layer_finish_steps(vg, layer, mnt),
        Step("retire-root", ("lvchange", "--addtag", TAG_RETIRED, f"{vg}/{f.root_lv}"),
             note="imgbase recover removes it once it is not in use"),
        Step("tag-pool", ("lvchange", "--addtag", TAG_POOL, f"{vg}/{f.pool}")),
        Step("tag-vg", ("vgchange", "--addtag", TAG_VG, vg), note="now it is a node"),
    ]
    return Plan("layout-init", tuple(steps),
                failure_hint="the anaconda root is untouched; run imgbase layout --init "
                "again, it removes what this attempt left")


def _findmnt(target: Path) -> dict[str, Any] | None:
    proc = run(["findmnt", "-J", "-n", "-o", "SOURCE,TARGET,FSTYPE,UUID", "--mountpoint",
                str(target)], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    fs: dict[str, Any] = json.loads(proc.stdout)["filesystems"][0]
    return fs


def _lv_of(device: str) -> lvm.LogicalVolume | None:
    """The LV behind a device path (/dev/mapper/vg-lv, /dev/vg/lv, /dev/dm-N), if any."""
    real = os.path.realpath(device)
    rows = json.loads(run(["lvs", "--reportformat", "json", "-o", "vg_name,lv_name,lv_dm_path"]
                          ).stdout)["report"][0]["lv"]
    for row in rows:
        if row["lv_dm_path"] and os.path.realpath(row["lv_dm_path"]) == real:
            return next(lv for lv in lvm.lvs(row["vg_name"]) if lv.name == row["lv_name"])
    return None


def gather_facts(root: str, nvr: str | None, kargs: tuple[str, ...] = ()) -> AdoptFacts:
    """kargs: kernel arguments for the first layer, after the image's (kickstart sites)."""
    top = Path(root)
    extra = tuple(check_arg(a) for a in kargs)
    if nvr is not None:
        Nvr.parse(nvr)
    fs = _findmnt(top)
    if fs is None:
        die(f"{root} is not a mount point", hint="give the root of the installed system, "
            "e.g. --from /mnt/sysimage")
    lv = _lv_of(fs["source"])
    if lv is None:
        die(f"{root} is on {fs['source']}, which is not an LVM logical volume",
            hint="install with autopart --type=thinp")
    if not lv.pool:
        die(f"{root} is on {lv.vg}/{lv.name}, which is not a thin volume",
            hint="install with autopart --type=thinp")
    if TAG_BASE in lv.tags or lv.vg in lvm.vgs_with_tag(TAG_VG):
        die(f"{root} is already on an imgbase node (volume group {lv.vg} is tagged {TAG_VG})",
            hint="imgbase status shows its layout")
    info_path = top / "usr/lib/imgbase/image.json"
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        die(f"{info_path} is missing: {root} was not installed from an imgbase image",
            hint="install with liveimg --url=<the .squashfs made by imgbase compose>")
    kernels = sorted((p.name.removeprefix("vmlinuz-") for p in (top / "boot").glob("vmlinuz-*")),
                     key=cmp_to_key(vercmp))
    if not kernels:
        die(f"no kernel in {top / 'boot'}", hint="is /boot mounted?")
    var = _findmnt(top / "var")
    var_lv = None
    if var is not None:
        found = _lv_of(var["source"])
        if found is None or found.vg != lv.vg or found.pool != lv.pool:
            die(f"{top / 'var'} is on {var['source']}, not a thin volume of {lv.vg}/{lv.pool}",
                hint="let imgbase make /var: install without a separate /var")
        var_lv = found.name
    boot = _findmnt(top / "boot")
    ours = [x for x in lvm.lvs(lv.vg) if x.name not in (lv.name, var_lv, lv.pool)
            and any(t.startswith("imgbase:") for t in x.tags)]
    leftovers = tuple(x.name for x in sorted(ours, key=lambda x: not x.origin))
    return AdoptFacts(
        root=root, vg=lv.vg, pool=lv.pool, root_lv=lv.name, nvr=nvr or info["nvr"],
        kernel=kernels[-1], fstab=(top / "etc/fstab").read_text(),
        kernel_args=(*info.get("kernel_args", []), *extra), var_lv=var_lv,
        boot_uuid=boot["uuid"] if boot else None, leftovers=leftovers,
        grubenv=bootloader.read_grubenv(top / "boot/grub/grubenv"))
