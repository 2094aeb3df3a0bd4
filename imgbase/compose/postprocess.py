"""Steps over a composed root tree, each a small function of (tree, ...).

Order (see build.py): layer files, hooks and services per layer; then
image.json, scrub (machine-id, SSH host keys, caches, logs), package database
into the image, factory /etc, and last the timestamp clamp.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import imgbase

from ..errors import ImgbaseError
from ..spec import ImageSpec, LayerSpec
from .chroot import chroot_run

IMAGE_JSON = "usr/lib/imgbase/image.json"
FACTORY_ETC = "usr/share/factory/etc"
SYSIMAGE_DPKG = "usr/lib/sysimage/dpkg"


def apply_files(tree: Path, layer: LayerSpec) -> int:
    """Copy the layer's files/ over the tree (owner root, modes kept); return the count."""
    if not layer.files:
        return 0
    count = 0
    for src in sorted(layer.files.rglob("*")):
        dst = tree / src.relative_to(layer.files)
        if src.is_dir() and not src.is_symlink():
            dst.mkdir(mode=src.stat().st_mode & 0o7777, exist_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
        os.lchown(dst, 0, 0)
        count += 1
    return count


def run_hooks(tree: Path, layer: LayerSpec, image: ImageSpec, env: dict[str, str]) -> None:
    """Run the layer's hook scripts in order inside the tree (API filesystems mounted)."""
    for hook in layer.hooks:
        inside = Path("/run/imgbase-hook")
        (tree / "run").mkdir(exist_ok=True)
        shutil.copy2(hook, tree / inside.relative_to("/"))
        (tree / inside.relative_to("/")).chmod(0o755)
        try:
            chroot_run(tree, [str(inside)], env={
                **env, "IMGBASE_LAYER": layer.name, "IMGBASE_NVR": str(image.nvr),
            })
        except ImgbaseError as exc:
            raise ImgbaseError(f"hook {hook.name} of layer {layer.name!r} failed: {exc.message}",
                               hint=f"the hook is {hook}") from exc
        finally:
            (tree / inside.relative_to("/")).unlink(missing_ok=True)


def apply_services(tree: Path, layer: LayerSpec) -> None:
    s = layer.services
    for verb, units in (("enable", s.enable), ("disable", s.disable), ("mask", s.mask)):
        if units:
            try:
                chroot_run(tree, ["systemctl", verb, *units])
            except ImgbaseError as exc:
                raise ImgbaseError(
                    f"layer {layer.name!r}: systemctl {verb} {' '.join(units)} failed: "
                    f"{exc.message}", hint=f"check the unit names in {layer.path}") from exc


def identity(image: ImageSpec, inputs_digest: str) -> dict[str, object]:
    """What names an image and how it was made: shared by image.json and the manifest."""
    return {
        "schema_version": 1,
        "nvr": str(image.nvr),
        "name": image.name,
        "version": image.version,
        "release": image.release,
        "distro": image.distro,
        "suite": image.suite,
        "architecture": image.architecture,
        "kernel_args": list(image.kernel_args),
        "source_date_epoch": image.source_date_epoch,
        "inputs_digest": inputs_digest,
        "imgbase_version": imgbase.__version__,
    }


def write_image_json(tree: Path, image: ImageSpec, inputs_digest: str) -> dict[str, object]:
    info = identity(image, inputs_digest)
    info["layers"] = [layer.name for layer in image.layers]
    path = tree / IMAGE_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def _empty_dir(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def scrub(tree: Path) -> None:
    """Drop what must be unique to a node or is only build-time litter."""
    (tree / "etc/machine-id").write_text("")  # empty: systemd makes one on first boot
    dbus_id = tree / "var/lib/dbus/machine-id"
    if dbus_id.exists() and not dbus_id.is_symlink():
        dbus_id.unlink()
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    resolv = tree / "etc/resolv.conf"
    if resolv.exists() and not resolv.is_symlink():
        resolv.unlink()
    (tree / "etc/hostname").write_text("localhost\n")
    for rel in ("var/lib/apt/lists", "var/cache/apt", "var/cache/debconf/tmp", "tmp", "var/tmp",
                "run", "var/lib/systemd/random-seed"):
        p = tree / rel
        if p.is_dir():
            _empty_dir(p)
        elif p.exists():
            p.unlink()
    (tree / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    for old in (tree / "var/cache/debconf").glob("*-old"):
        old.unlink()
    for log in (tree / "var/log").rglob("*"):
        if log.is_file():
            log.unlink()
    for cache in ("var/cache/ldconfig/aux-cache",):
        (tree / cache).unlink(missing_ok=True)


def move_package_db(tree: Path, db_paths: tuple[str, ...]) -> None:
    """Keep the package database with the image, not in the shared /var.

    ``var/lib/dpkg`` moves to ``usr/lib/sysimage/dpkg`` and becomes a relative
    symlink; a tmpfiles.d rule puts the link into a node's shared /var at boot,
    so every layer sees the package state of its own image.
    """
    rules = []
    for rel in db_paths:
        src = tree / rel
        if not src.is_dir() or src.is_symlink():
            continue
        dst = tree / "usr/lib/sysimage" / Path(rel).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dst)
        target = os.path.relpath(dst, src.parent)
        src.symlink_to(target)
        rules.append(f"L+ /{rel} - - - - {target}")
    if rules:
        conf = tree / "usr/lib/tmpfiles.d/imgbase-package-db.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text("# imgbase: the package database travels with the image\n"
                        + "\n".join(rules) + "\n")


def factory_etc(tree: Path) -> None:
    """A pristine copy of /etc: the baseline of later 3-way merges."""
    dst = tree / FACTORY_ETC
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tree / "etc", dst, symlinks=True)


def clamp_mtimes(tree: Path, epoch: int) -> int:
    """Set every timestamp newer than ``epoch`` to ``epoch``; return how many changed."""
    changed = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.lstat(p).st_mtime > epoch:
                os.utime(p, (epoch, epoch), follow_symlinks=False)
                changed += 1
    if os.lstat(tree).st_mtime > epoch:
        os.utime(tree, (epoch, epoch))
    return changed


def check_boot_files(tree: Path, live: bool) -> list[str]:
    """Every kernel has an initramfs with LVM thin support (and the live-boot script)."""
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImgbaseError("the image has no kernel in /boot",
                           hint="add a kernel package (e.g. linux-image-cloud-amd64) to a layer")
    for kver in kernels:
        initrd = tree / "boot" / f"initrd.img-{kver}"
        if not initrd.exists():
            raise ImgbaseError(f"kernel {kver} has no initramfs",
                               hint="is initramfs-tools in a layer?")
        listing = chroot_run(tree, ["lsinitramfs", f"/boot/initrd.img-{kver}"])
        needed_files = ["dm-thin-pool.ko", "squashfs.ko", "overlay.ko", "bin/lvm"]
        if live:
            needed_files.append("scripts/local-bottom/imgbase-live")
        for needed in needed_files:
            if needed not in listing:
                raise ImgbaseError(f"initramfs of {kver} lacks {needed}",
                                   hint="is the imgbase package (initramfs hook) in a layer?")
    return kernels
