"""Steps over a composed root tree, each a small function of (tree, ...).

Order (see build.py): layer files, hooks and services per layer; then
image.json, scrub (machine-id, SSH host keys, caches, logs), package database
into the image, factory /etc, and last the timestamp clamp.

The tree's symlinks are the image's, not the build host's: every path a step writes or
removes is resolved inside the tree as a chroot of it would (:func:`imgbase.intree.inside`:
Debian's ``var/run -> /run`` is the tree's ``run``), and its last component is replaced,
never followed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import imgbase

from .. import intree
from ..errors import ImgbaseError
from ..image.spec import ImageSpec, LayerSpec
from .chroot import chroot_run, remove_tree

IMAGE_JSON = "usr/lib/imgbase/image.json"
FACTORY_ETC = "usr/share/factory/etc"
SYSIMAGE_DPKG = "usr/lib/sysimage/dpkg"


def apply_files(tree: Path, layer: LayerSpec) -> int:
    """Copy the layer's files/ over the tree (owner root, modes kept); return the count.

    A path goes where the image will see it: its directories resolved inside the tree
    (``var/run/x`` of a tree with ``var/run -> /run`` is the tree's ``run/x``), the file
    itself replacing what is there."""
    if not layer.files:
        return 0
    count = 0
    for src in sorted(layer.files.rglob("*")):
        rel = src.relative_to(layer.files).as_posix()
        st = src.lstat()
        try:
            if stat.S_ISDIR(st.st_mode):
                intree.resolve(tree, rel, create=True, mode=stat.S_IMODE(st.st_mode))
                continue
            dst = intree.inside(tree, rel, create=True)
            _replaceable(dst)
        except (intree.NotInside, NotADirectoryError, IsADirectoryError) as exc:
            raise ImgbaseError(f"layer {layer.name!r}: files/{rel} cannot go into the tree: "
                               f"{exc}", hint=f"the files are in {layer.files}") from exc
        if stat.S_ISLNK(st.st_mode):
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
        os.lchown(dst, 0, 0)
        count += 1
    return count


def _replaceable(path: Path) -> None:
    """Remove path (not followed) so that a new file can take its place; a directory
    is not replaced by a file."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path} is a directory in the tree")
    path.unlink()


def write_text(tree: Path, rel: str, text: str) -> Path:
    """Write a file of the tree: rel resolved inside it, a symlink at rel replaced by
    the file (an existing file keeps its mode and owner)."""
    path = intree.inside(tree, rel, create=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        path.unlink()
        fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def run_hooks(tree: Path, layer: LayerSpec, image: ImageSpec, env: dict[str, str]) -> None:
    """Run the layer's hook scripts in order inside the tree (API filesystems mounted)."""
    inside = "run/imgbase-hook"
    for hook in layer.hooks:
        copy = intree.inside(tree, inside, create=True)
        _replaceable(copy)
        shutil.copy2(hook, copy, follow_symlinks=False)
        copy.chmod(0o755)
        try:
            chroot_run(tree, [f"/{inside}"], env={
                **env, "IMGBASE_LAYER": layer.name, "IMGBASE_NVR": str(image.nvr),
            })
        except ImgbaseError as exc:
            raise ImgbaseError(f"hook {hook.name} of layer {layer.name!r} failed: {exc.message}",
                               hint=f"the hook is {hook}") from exc
        finally:
            copy.unlink(missing_ok=True)  # in the tree's /run, a tmpfs mounted for hooks


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
    write_text(tree, IMAGE_JSON, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def _empty_dir(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _in(tree: Path, rel: str) -> Path | None:
    """rel's path in the tree (:func:`intree.inside`), None where its directory is not."""
    try:
        return intree.inside(tree, rel)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _dir_in(tree: Path, rel: str) -> Path | None:
    """The directory rel of the tree, resolved inside it; None if there is none."""
    try:
        return intree.resolve(tree, rel)
    except (FileNotFoundError, NotADirectoryError):
        return None


def scrub(tree: Path) -> None:
    """Drop what must be unique to a node or is only build-time litter."""
    write_text(tree, "etc/machine-id", "")  # empty: systemd makes one on first boot
    dbus_id = _in(tree, "var/lib/dbus/machine-id")
    if dbus_id and dbus_id.is_file() and not dbus_id.is_symlink():
        dbus_id.unlink()
    if ssh := _dir_in(tree, "etc/ssh"):
        for key in ssh.glob("ssh_host_*"):
            key.unlink()
    resolv = _in(tree, "etc/resolv.conf")
    if resolv and resolv.is_file() and not resolv.is_symlink():
        resolv.unlink()
    write_text(tree, "etc/hostname", "localhost\n")
    for rel in ("var/lib/apt/lists", "var/cache/apt", "var/cache/debconf/tmp", "tmp", "var/tmp",
                "run", "var/lib/systemd/random-seed"):
        if d := _dir_in(tree, rel):
            _empty_dir(d)
        elif (p := _in(tree, rel)) and os.path.lexists(p):
            p.unlink()
    intree.resolve(tree, "var/lib/apt/lists/partial", create=True)
    if debconf := _dir_in(tree, "var/cache/debconf"):
        for old in debconf.glob("*-old"):
            old.unlink()
    if logs := _dir_in(tree, "var/log"):
        for log in logs.rglob("*"):
            if log.is_file() or log.is_symlink():
                log.unlink()
    for cache in ("var/cache/ldconfig/aux-cache",):
        if (p := _in(tree, cache)) and not p.is_dir():
            p.unlink(missing_ok=True)


def move_package_db(tree: Path, db_paths: tuple[str, ...]) -> None:
    """Keep the package database with the image, not in the shared /var.

    ``var/lib/dpkg`` moves to ``usr/lib/sysimage/dpkg`` and becomes a relative
    symlink; a tmpfiles.d rule puts the link into a node's shared /var at boot,
    so every layer sees the package state of its own image.
    """
    rules = []
    for rel in db_paths:
        src = _in(tree, rel)
        if src is None or not src.is_dir() or src.is_symlink():
            continue
        dst = intree.inside(tree, f"usr/lib/sysimage/{Path(rel).name}", create=True)
        shutil.move(src, dst)
        target = os.path.relpath(dst, src.parent)
        src.symlink_to(target)
        rules.append(f"L+ /{rel} - - - - {target}")
    if rules:
        write_text(tree, "usr/lib/tmpfiles.d/imgbase-package-db.conf",
                   "# imgbase: the package database travels with the image\n"
                   + "\n".join(rules) + "\n")


def factory_etc(tree: Path) -> None:
    """A pristine copy of /etc: the baseline of later 3-way merges."""
    dst = intree.inside(tree, FACTORY_ETC, create=True)
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif os.path.lexists(dst):
        dst.unlink()
    shutil.copytree(intree.resolve(tree, "etc"), dst, symlinks=True)


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


def drop_kernel_modules(tree: Path, excluded: tuple[str, ...]) -> int:
    """Remove the excluded module directories of every kernel in the tree, then rebuild
    its module index (depmod, inside the tree); returns the bytes removed. Each directory
    is found inside the kernel's own module tree, never through a symlink out of it."""
    removed = 0
    modules = _dir_in(tree, "usr/lib/modules")
    for kdir in sorted(modules.iterdir()) if modules else []:
        base = kdir / "kernel"
        if kdir.is_symlink() or not kdir.is_dir() or base.is_symlink() or not base.is_dir():
            continue
        inside = base.resolve()
        for rel in excluded:
            # resolved as a chroot of the tree would, and then it must still be a directory
            # below this kernel's own module tree (no link leads out of it)
            target = _dir_in(tree, f"{kdir.relative_to(tree)}/kernel/{rel}")
            if target is None or not target.is_dir() or target.is_symlink() \
                    or not target.is_relative_to(inside) or target == inside:
                continue
            removed += sum(p.lstat().st_size for p in target.rglob("*")
                           if p.is_file() and not p.is_symlink())
            remove_tree(target)
        if excluded:
            chroot_run(tree, ["depmod", kdir.name])
    return removed


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
            needed_files += ["scripts/local-bottom/imgbase-live",
                             "scripts/local-block/imgbase-rescue",
                             "scripts/local-bottom/imgbase-rescue"]
        for needed in needed_files:
            if needed not in listing:
                raise ImgbaseError(f"initramfs of {kver} lacks {needed}",
                                   hint="is the imgbase package (initramfs hook) in a layer?")
    return kernels
