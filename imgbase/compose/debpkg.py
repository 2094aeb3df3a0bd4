"""Build imgbase itself as a Debian package, from the tree it runs from.

The node image carries the same imgbase that composed it: its Python package,
the ``imgbase`` and ``imgbase-agent`` commands, and the boot assets (initramfs
hook and live-boot script, systemd units, the thin pool's LVM profile) from
``boot/``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import imgbase

from ..image.spec import tree_digest
from ..run import run

PACKAGE_DIR = Path(imgbase.__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent
BOOT_DIR = PROJECT_DIR / "boot"

DEPENDS = [
    "python3 (>= 3.11)", "lvm2", "thin-provisioning-tools", "squashfs-tools", "rsync",
    "e2fsprogs", "gdisk", "initramfs-tools", "gpgv", "python3-requests", "python3-tomli-w",
]
RECOMMENDS = ["python3-libvirt", "python3-dbus"]

SCRIPT = """#!/usr/bin/python3
from imgbase.{module} import main
raise SystemExit(main())
"""


def source_digest() -> str:
    """sha256 of everything that goes into the package (part of the compose cache key)."""
    h = hashlib.sha256(imgbase.__version__.encode())
    h.update(tree_digest(PACKAGE_DIR).encode())
    if BOOT_DIR.is_dir():
        h.update(tree_digest(BOOT_DIR).encode())
    h.update(repr((DEPENDS, RECOMMENDS, SCRIPT)).encode())
    return h.hexdigest()


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    dirs_exist_ok=True)


def build_deb(outdir: Path, source_date_epoch: int) -> Path:
    """Write ``imgbase_<version>_all.deb`` into outdir and return its path."""
    if not BOOT_DIR.is_dir():
        raise FileNotFoundError(f"{BOOT_DIR}: boot assets missing (run from a source checkout)")
    version = imgbase.__version__
    root = outdir / "imgbase-deb"
    if root.exists():
        shutil.rmtree(root)
    pydir = root / "usr/lib/python3/dist-packages/imgbase"
    _copy_tree(PACKAGE_DIR, pydir)
    run(["python3", "-m", "compileall", "-q", "--invalidation-mode", "checked-hash",
         "-d", "/usr/lib/python3/dist-packages/imgbase", str(pydir)])
    bindir = root / "usr/bin"
    bindir.mkdir(parents=True)
    for name, module in (("imgbase", "cli"), ("imgbase-agent", "agent.main")):
        (bindir / name).write_text(SCRIPT.format(module=module))
        (bindir / name).chmod(0o755)
    _copy_tree(BOOT_DIR / "initramfs-tools", root / "usr/share/initramfs-tools")
    if (BOOT_DIR / "systemd").is_dir():
        _copy_tree(BOOT_DIR / "systemd", root / "usr/lib/systemd/system")
    _copy_tree(BOOT_DIR / "lvm", root / "etc/lvm/profile")
    docdir = root / "usr/share/doc/imgbase"
    docdir.mkdir(parents=True)
    (docdir / "README").write_text("imgbase: image-based hypervisor nodes on LVM thin pools.\n")
    size_kib = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) // 1024 + 1
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        f"Package: imgbase\nVersion: {version}\nArchitecture: all\n"
        f"Maintainer: imgbase developers <imgbase@localhost>\n"
        f"Installed-Size: {size_kib}\nSection: admin\nPriority: optional\n"
        f"Depends: {', '.join(DEPENDS)}\nRecommends: {', '.join(RECOMMENDS)}\n"
        "Description: image-based hypervisor node tooling\n"
        " Compose, install, update and roll back image-based hypervisor nodes on LVM\n"
        " thin pools; includes the imgbase-agent cluster agent.\n"
    )
    for path in root.rglob("*"):
        os.utime(path, (source_date_epoch, source_date_epoch), follow_symlinks=False)
    deb = outdir / f"imgbase_{version}_all.deb"
    env = {"SOURCE_DATE_EPOCH": str(source_date_epoch)}
    run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)], env=env)
    shutil.rmtree(root)
    deb.chmod(0o644)
    return deb
