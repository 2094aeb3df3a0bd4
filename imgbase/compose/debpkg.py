"""Build imgbase itself as a Debian package, from the tree it runs from.

The node image carries the same imgbase that composed it: its Python package,
the ``imgbase`` and ``imgbase-agent`` commands, and the boot assets (initramfs
hook and live-boot script, systemd units, the thin pool's LVM profile) from
``boot/``.
"""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import os
import shutil
from pathlib import Path

import imgbase

from ..image.spec import tree_digest
from ..resources import BOOT, COMPLETIONS, MAN
from ..run import run

PACKAGE_DIR = Path(imgbase.__file__).resolve().parent
BOOT_DIR = BOOT

DEPENDS = [
    "python3 (>= 3.11)", "lvm2", "thin-provisioning-tools", "squashfs-tools", "rsync",
    "e2fsprogs", "gdisk", "initramfs-tools", "gpgv", "python3-requests", "python3-tomli-w",
    "python3-dbus", "python3-libvirt",  # health and selfcheck speak to systemd and libvirt
]
RECOMMENDS: list[str] = []

MAINTAINER = "imgbase developers <imgbase@example.org>"
COPYRIGHT = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: imgbase
Source: the imgbase repository

Files: *
Copyright: 2026 the imgbase developers
License: GPL-2+
 This program is free software; you can redistribute it and/or modify it under the terms
 of the GNU General Public License as published by the Free Software Foundation; either
 version 2 of the License, or (at your option) any later version.
 .
 On Debian systems, the complete text of the GNU General Public License version 2 can be
 found in /usr/share/common-licenses/GPL-2.
"""
CHANGELOG = """\
imgbase ({version}) unstable; urgency=medium

  * imgbase {version}, built by imgbase compose from its source tree.

 -- {maintainer}  {date}
""".replace("{maintainer}", MAINTAINER)

# bytecode made where the package is installed (in a composed image: at compose time), as
# Debian's py3compile does, but hash-checked: the image's clamped mtimes keep it valid
POSTINST = """#!/bin/sh
set -e
if [ "$1" = configure ]; then
    python3 -m compileall -q --invalidation-mode checked-hash {pydir}
fi
""".format(pydir="/usr/lib/python3/dist-packages/imgbase")
PRERM = """#!/bin/sh
set -e
find {pydir} -depth -type d -name __pycache__ -exec rm -rf {{}} +
""".format(pydir="/usr/lib/python3/dist-packages/imgbase")

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
    h.update(repr((DEPENDS, RECOMMENDS, SCRIPT, POSTINST, PRERM, COPYRIGHT, CHANGELOG)).encode())
    for data in (MAN, COMPLETIONS):
        if data.is_dir():
            h.update(tree_digest(data.resolve()).encode())
    return h.hexdigest()


def _gzip(data: bytes, path: Path, mtime: int) -> None:
    """gzip -9n: no name, a fixed time (the same bytes every build)."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9,
                                                fileobj=raw, mtime=mtime) as f:
        f.write(data)


def _copy_tree(src: Path, dst: Path) -> None:
    """src's files; not imgbase's data (layers, templates, boot assets: a node needs only
    the boot assets, which go where they are used)."""
    ignore = ["__pycache__", "*.pyc"] + (["data"] if src == PACKAGE_DIR else [])
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*ignore), dirs_exist_ok=True)


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
    (docdir / "copyright").write_text(COPYRIGHT)
    _gzip(CHANGELOG.format(version=version, date=email.utils.formatdate(
        source_date_epoch)).encode(), docdir / "changelog.gz", source_date_epoch)
    for page, section in (("imgbase.1", "1"), ("imgbase-agent.8", "8")):
        mandir = root / f"usr/share/man/man{section}"
        mandir.mkdir(parents=True, exist_ok=True)
        _gzip((MAN / page).read_bytes(), mandir / f"{page}.gz", source_date_epoch)
    for src in sorted(COMPLETIONS.iterdir()):  # generated by make docs (clidoc)
        dest = (root / "usr/share/zsh/vendor-completions" / src.name if src.name.startswith("_")
                else root / "usr/share/bash-completion/completions" / src.stem)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    size_kib = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) // 1024 + 1
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        f"Package: imgbase\nVersion: {version}\nArchitecture: all\n"
        f"Maintainer: {MAINTAINER}\n"
        f"Installed-Size: {size_kib}\nSection: admin\nPriority: optional\n"
        f"Depends: {', '.join(DEPENDS)}\n"
        + (f"Recommends: {', '.join(RECOMMENDS)}\n" if RECOMMENDS else "") +
        "Description: image-based hypervisor node tooling\n"
        " Compose, install, update and roll back image-based hypervisor nodes on LVM\n"
        " thin pools; includes the imgbase-agent cluster agent.\n"
    )
    (root / "DEBIAN/conffiles").write_text(
        "".join(f"/{p.relative_to(root)}\n" for p in sorted((root / "etc").rglob("*"))
                if p.is_file()))
    for script, text in (("postinst", POSTINST), ("prerm", PRERM)):
        (root / "DEBIAN" / script).write_text(text)
        (root / "DEBIAN" / script).chmod(0o755)
    for path in root.rglob("*"):
        os.utime(path, (source_date_epoch, source_date_epoch), follow_symlinks=False)
    deb = outdir / f"imgbase_{version}_all.deb"
    env = {"SOURCE_DATE_EPOCH": str(source_date_epoch)}
    run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)], env=env)
    shutil.rmtree(root)
    deb.chmod(0o644)
    return deb
