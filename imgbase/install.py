"""`imgbase install`: a node onto a blank disk, without anaconda.

Plan, then apply: ``plan_install`` is pure (facts in, steps out) and is what
``--dry-run`` prints and ``--json`` emits; ``apply`` runs the steps through the
one runner, reporting each as a progress event.

Disk layout (GPT): 1 BIOS boot (1 MiB), 2 reserved for an ESP (256 MiB, left
unformatted for grub-efi), 3 /boot (ext4, 1 GiB), 4 LVM PV. The volume group
(tag imgbase:vg) holds a thin pool (imgbase:pool), the image's base LV
(<nvr>, read-only, activation skipped, imgbase:base), its first layer
(<nvr>+1, writable thin snapshot, imgbase:layer) and the volumes
(imgbase:volume): /var always, the NIST set with --volumes nist.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ImgbaseError, die
from .naming import Layer, Nvr
from .progress import Progress
from .run import run
from .storage.lvm import TAG_BASE, TAG_LAYER, TAG_POOL, TAG_VG, TAG_VOLUME

GIB = 1 << 30
MIN_DISK = 8 * GIB
WORK = Path("/run/imgbase/install")
VOLUME_PROFILES: dict[str, list[tuple[str, str, str]]] = {
    # (mount point, LV name, size)
    "minimal": [("/var", "var", "4G")],
    "nist": [("/var", "var", "4G"), ("/var/log", "var_log", "2G"),
             ("/var/log/audit", "var_log_audit", "1G"), ("/var/crash", "var_crash", "2G"),
             ("/var/tmp", "var_tmp", "1G"), ("/home", "home", "1G"), ("/tmp", "tmp", "1G")],
}


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...] = ()
    write: tuple[str, str] | None = None  # (path, content)
    note: str = ""

    def describe(self) -> str:
        if self.write:
            return f"{self.name}: write {self.write[0]}"
        return f"{self.name}: {' '.join(self.argv)}"


@dataclass(frozen=True)
class InstallFacts:
    disk: str
    disk_size: int
    image: str
    nvr: str
    kernel: str  # version, e.g. 6.1.0-56-cloud-amd64
    kernel_args: tuple[str, ...] = ()
    vg: str = "imgbase"
    volumes: str = "minimal"
    pool_size: str | None = None  # e.g. "20G"; default 90% of the free space
    base_size: str = "8G"
    grub_target: str = "i386-pc"
    extra: dict[str, str] = field(default_factory=dict)


def partition(disk: str, n: int) -> str:
    """Path of partition n of disk.

    >>> partition("/dev/vdb", 3), partition("/dev/nvme0n1", 3)
    ('/dev/vdb3', '/dev/nvme0n1p3')
    """
    return f"{disk}{'p' if disk[-1].isdigit() else ''}{n}"


def plan_install(f: InstallFacts) -> list[Step]:
    """Every step of an install, in order; pure."""
    nvr = Nvr.parse(f.nvr)
    layer = str(Layer(nvr, 1))
    vg, boot_part, pv = f.vg, partition(f.disk, 3), partition(f.disk, 4)
    base_mnt, root_mnt, boot_mnt = WORK / "base", WORK / "root", WORK / "boot"
    pool = ["-L", f.pool_size] if f.pool_size else ["-l", "90%FREE"]
    steps = [
        Step("wipe", ("wipefs", "--all", "--force", f.disk)),
        Step("partition", ("sgdisk", "--zap-all", "-n1:1M:+1M", "-t1:EF02", "-c1:bios",
                           "-n2:0:+256M", "-t2:EF00", "-c2:esp", "-n3:0:+1G", "-t3:8300",
                           "-c3:boot", "-n4:0:0", "-t4:8E00", "-c4:imgbase", f.disk)),
        Step("settle", ("udevadm", "settle")),
        Step("mkfs-boot", ("mkfs.ext4", "-q", "-F", "-L", "boot", boot_part)),
        Step("pv", ("pvcreate", "-ff", "-y", pv)),
        Step("vg", ("vgcreate", "-y", "--addtag", TAG_VG, vg, pv)),
        Step("pool", ("lvcreate", "-y", "--type", "thin-pool", *pool, "--addtag", TAG_POOL,
                      "-n", "pool", vg)),
        Step("base", ("lvcreate", "-y", "-V", f.base_size, "-T", f"{vg}/pool", "-n", str(nvr),
                      "--addtag", TAG_BASE)),
        Step("mkfs-base", ("mkfs.ext4", "-q", "-E", "nodiscard", f"/dev/{vg}/{nvr}")),
        Step("mkdir", ("mkdir", "-p", str(base_mnt), str(root_mnt), str(boot_mnt))),
        Step("mount-base", ("mount", f"/dev/{vg}/{nvr}", str(base_mnt))),
        Step("unpack", ("unsquashfs", "-q", "-n", "-f", "-d", str(base_mnt), f.image)),
        Step("umount-base", ("umount", str(base_mnt))),
        Step("base-readonly", ("lvchange", "-y", "--permission", "r",
                               "--setactivationskip", "y", f"{vg}/{nvr}")),
        Step("layer", ("lvcreate", "-y", "-s", "-kn", "-prw", "--addtag", TAG_LAYER,
                       "-n", layer, f"{vg}/{nvr}")),
        Step("layer-activate", ("lvchange", "-ay", "-K", f"{vg}/{layer}")),
        Step("layer-fsck", ("e2fsck", "-fy", f"/dev/{vg}/{layer}")),
        Step("layer-uuid", ("tune2fs", "-U", "random", f"/dev/{vg}/{layer}"),
             note="a fresh filesystem UUID for each layer"),
        Step("mount-layer", ("mount", "-o", "discard", f"/dev/{vg}/{layer}", str(root_mnt))),
    ]
    fstab = [f"/dev/{vg}/{layer} / ext4 defaults,discard 0 1",
             "LABEL=boot /boot ext4 defaults 0 2"]
    for mountpoint, lv, size in VOLUME_PROFILES[f.volumes]:
        dev, mnt = f"/dev/{vg}/{lv}", WORK / f"vol-{lv}"
        steps += [
            Step(f"volume-{lv}", ("lvcreate", "-y", "-V", size, "-T", f"{vg}/pool", "-n", lv,
                                  "--addtag", TAG_VOLUME)),
            Step(f"mkfs-{lv}", ("mkfs.ext4", "-q", "-E", "nodiscard", dev)),
            Step(f"fill-{lv}", ("sh", "-c", f'mkdir -p "{mnt}" && mount "{dev}" "{mnt}" && '
                                f'cp -a "{root_mnt}{mountpoint}/." "{mnt}/" 2>/dev/null; '
                                f'umount "{mnt}"')),
        ]
        fstab.append(f"{dev} {mountpoint} ext4 defaults,discard 0 2")
    kargs = " ".join(["rw", *f.kernel_args])
    steps += [
        Step("fstab", write=(f"{root_mnt}/etc/fstab", "\n".join(fstab) + "\n")),
        Step("mount-boot", ("mount", boot_part, str(boot_mnt))),
        Step("kernel", ("install", "-D", "-m", "0644", f"{root_mnt}/boot/vmlinuz-{f.kernel}",
                        f"{boot_mnt}/{layer}/vmlinuz")),
        Step("initrd", ("install", "-D", "-m", "0644", f"{root_mnt}/boot/initrd.img-{f.kernel}",
                        f"{boot_mnt}/{layer}/initrd.img")),
        Step("grub-install", ("grub-install", f"--target={f.grub_target}",
                              f"--boot-directory={boot_mnt}", f.disk)),
        Step("grub-cfg", write=(f"{boot_mnt}/grub/grub.cfg", grub_cfg(layer))),
        Step("grub-entries", write=(f"{boot_mnt}/grub/imgbase-entries.cfg",
                                    grub_entry(layer, f"/dev/{vg}/{layer}", kargs))),
        Step("grub-default", ("grub-editenv", f"{boot_mnt}/grub/grubenv", "set",
                              f"saved_entry={layer}")),
        Step("umount", ("umount", str(boot_mnt), str(root_mnt))),
        Step("deactivate", ("vgchange", "-an", vg)),
    ]
    return steps


def grub_cfg(default: str) -> str:
    return (
        "# imgbase: written by imgbase install; entries live in imgbase-entries.cfg\n"
        "serial --unit=0 --speed=115200\nterminal_input serial console\n"
        "terminal_output serial console\nset timeout=2\n"
        "insmod part_gpt\ninsmod ext2\nsearch --no-floppy --label --set=root boot\n"
        "load_env\n"
        f'if [ -n "${{saved_entry}}" ]; then set default="${{saved_entry}}"; '
        f'else set default="{default}"; fi\n'
        "source /grub/imgbase-entries.cfg\n"
    )


def grub_entry(layer: str, root: str, kargs: str) -> str:
    return (f"menuentry 'imgbase {layer}' --id '{layer}' {{\n"
            f"  linux /{layer}/vmlinuz root={root} {kargs}\n"
            f"  initrd /{layer}/initrd.img\n}}\n")


# -- facts: what the planner needs, gathered (and checked) before anything is written ----

def running_image() -> str:
    """The squashfs the live environment runs from (the lower of the live overlay)."""
    with open("/proc/self/mounts") as f:
        for line in f:
            src, target = line.split()[:2]
            if target == "/run/imgbase/live/lower":
                return src
    die("no image given and this is not a live imgbase environment",
        hint="give the image: imgbase install --disk DEV IMAGE.squashfs")


def gather_facts(disk: str, image: str | None, *, volumes: str, pool_size: str | None,
                 wipe: bool) -> InstallFacts:
    image = image or running_image()
    try:
        mode = os.stat(disk).st_mode
    except FileNotFoundError:
        die(f"{disk}: no such disk", hint="lsblk lists the disks")
    if not stat.S_ISBLK(mode):
        die(f"{disk} is not a block device", hint="give a whole disk, e.g. /dev/vdb")
    size = int(run(["blockdev", "--getsize64", disk]).stdout)
    if size < MIN_DISK:
        die(f"{disk} is too small: {size / GIB:.1f} GiB, at least {MIN_DISK / GIB:.0f} GiB "
            "needed", hint="use a larger disk")
    tree = json.loads(run(["lsblk", "-J", "-b", "-o", "NAME,PATH,MOUNTPOINT,FSTYPE", disk]
                          ).stdout)["blockdevices"]
    mounted = [d["path"] for d in _walk(tree) if d.get("mountpoint")]
    if mounted:
        die(f"{disk} is in use: {', '.join(mounted)} mounted", hint="unmount it first")
    lvm = [d["path"] for d in _walk(tree) if d.get("fstype") == "LVM2_member"]
    if lvm and not wipe:
        die(f"{disk} holds LVM physical volumes ({', '.join(lvm)}), perhaps a node",
            hint="add --wipe to destroy everything on it")
    info = _image_info(image)
    return InstallFacts(disk=disk, disk_size=size, image=image, nvr=info["nvr"],
                        kernel=info["kernel"], kernel_args=tuple(info.get("kernel_args", [])),
                        volumes=volumes, pool_size=pool_size)


def _walk(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for d in devices:
        out.append(d)
        out += _walk(d.get("children", []))
    return out


def _image_info(image: str) -> dict[str, Any]:
    proc = run(["unsquashfs", "-cat", image, "usr/lib/imgbase/image.json"], check=False)
    if proc.returncode != 0:
        die(f"{image} is not an imgbase image (no /usr/lib/imgbase/image.json)",
            hint="install an image made by imgbase compose")
    info: dict[str, Any] = json.loads(proc.stdout)
    listing = run(["unsquashfs", "-l", "-d", "", image, "boot"]).stdout.split()
    kernels = sorted(p.removeprefix("/boot/vmlinuz-") for p in listing
                     if p.startswith("/boot/vmlinuz-"))
    if not kernels:
        die(f"{image} has no kernel in /boot", hint="compose the image with a kernel package")
    info["kernel"] = kernels[-1]
    return info


def apply(steps: list[Step], progress: Progress) -> None:
    for step in steps:
        with progress.step(step.name):
            if step.write:
                path = Path(step.write[0])
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(step.write[1])
                os.replace(tmp, path)
            else:
                try:
                    run(step.argv)
                except ImgbaseError as exc:
                    raise ImgbaseError(f"install step {step.name!r} failed: {exc.message}",
                                       hint="the disk is not bootable; run the install again "
                                       "with --wipe") from exc


def steps_json(steps: list[Step]) -> str:
    return json.dumps([asdict(s) for s in steps], indent=2)
