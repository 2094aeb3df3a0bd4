"""`imgbase package IMAGE --format deb|rpm`: an image wrapped as an update package.

Sites that roll out software through their package manager get each image as
``<name>-image-update`` (version and release of the image). The package installs the
squashfs with its ``.sha256`` and ``.sha256.sig`` under ``/usr/share/imgbase/images/``, and
its post-install script runs ``imgbase update`` on it -- with the *new* image's imgbase,
unpacked from the squashfs, so an update can change how updates are done. "Already up
to date" (exit 77) counts as success; any other refusal fails the package install with
imgbase's message. The package lands in the booted layer only: the new layer comes from
the image, so it never carries the package.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import die
from .run import run
from .trust import sig_path, sums_path
from .update import image_info

IMAGES = "usr/share/imgbase/images"
FORMATS = ("deb", "rpm")
RPM_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}

POSTINST = """#!/bin/sh
# run imgbase update with the imgbase of the image being installed
set -e
image={image}
tmp=$(mktemp -d /run/imgbase-package.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
unsquashfs -q -n -d "$tmp/root" "$image" usr/lib/python3/dist-packages/imgbase >/dev/null
rc=0
PYTHONPATH="$tmp/root/usr/lib/python3/dist-packages" python3 -P -m imgbase update "$image" || rc=$?
[ "$rc" -eq 0 ] || [ "$rc" -eq 77 ] || exit "$rc"
"""


@dataclass(frozen=True)
class PackageSpec:
    name: str  # <image name>-image-update
    version: str
    release: str
    architecture: str  # Debian's name
    nvr: str
    files: tuple[Path, ...]  # the image, its .sha256 and .sha256.sig

    @property
    def image_path(self) -> str:
        return f"/{IMAGES}/{self.nvr}.squashfs"


def package_spec(image: str) -> PackageSpec:
    info = image_info(image)  # readable, and an imgbase image
    sums = sums_path(image)
    if not sums.exists():
        die(f"{sums} is missing", hint="package the image with the .sha256 compose wrote")
    if not sig_path(image).exists():
        die(f"{image} is not signed: nodes would refuse the package's update",
            hint="imgbase sign IMAGE first")
    files = (Path(image), sums, sig_path(image))
    return PackageSpec(f"{info['name']}-image-update", str(info["version"]),
                       str(info["release"]), str(info.get("architecture", "amd64")),
                       str(info["nvr"]), files)


def _payload(spec: PackageSpec, root: Path) -> None:
    """The image and its sidecars, named by the NVR, under root/usr/share/imgbase/images."""
    dest = root / IMAGES
    dest.mkdir(parents=True)
    for src in spec.files:
        suffix = src.name[len(Path(spec.files[0]).name):]  # "", ".sha256", ".sha256.sig"
        target = dest / f"{spec.nvr}.squashfs{suffix}"
        try:
            os.link(src.resolve(), target)  # no copy of 250 MB when on one filesystem
        except OSError:
            shutil.copyfile(src, target)
        target.chmod(0o644)


def build_deb(spec: PackageSpec, outdir: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=outdir, prefix=".package.") as tmp:
        root = Path(tmp) / "root"
        _payload(spec, root)
        (root / "DEBIAN").mkdir()
        size_kib = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) // 1024 + 1
        (root / "DEBIAN/control").write_text(
            f"Package: {spec.name}\nVersion: {spec.version}-{spec.release}\n"
            f"Architecture: {spec.architecture}\n"
            "Maintainer: imgbase developers <imgbase@localhost>\n"
            f"Installed-Size: {size_kib}\nSection: admin\nPriority: optional\n"
            "Depends: imgbase, squashfs-tools, python3\n"
            f"Description: update this imgbase node to {spec.nvr}\n"
            f" Installs the {spec.nvr} image and runs imgbase update on it: the image\n"
            " becomes the next boot, on trial. Reboot to use it.\n")
        postinst = root / "DEBIAN/postinst"
        postinst.write_text(POSTINST.format(image=spec.image_path).replace(
            "set -e\n", 'set -e\n[ "$1" = configure ] || exit 0\n', 1))
        postinst.chmod(0o755)
        deb = outdir / f"{spec.name}_{spec.version}-{spec.release}_{spec.architecture}.deb"
        # the squashfs is compressed already: store it as it is
        run(["dpkg-deb", "--root-owner-group", "-Znone", "--build", str(root), str(deb)])
    return deb


RPM_SPEC = """Name: {name}
Version: {version}
Release: {release}
Summary: update this imgbase node to {nvr}
License: various (the image's packages)
BuildArch: {arch}
Requires: imgbase
Requires: squashfs-tools
Requires: python3
%define _binary_payload w0.ufdio
%define __os_install_post %{{nil}}
%define _build_id_links none

%description
Installs the {nvr} image and runs imgbase update on it: the image becomes the next
boot, on trial. Reboot to use it.

%install
mkdir -p %{{buildroot}}
cp -a {payload}/. %{{buildroot}}/

%post
{post}
%files
{files}
"""


def build_rpm(spec: PackageSpec, outdir: Path) -> Path:
    arch = RPM_ARCH.get(spec.architecture, spec.architecture)
    with tempfile.TemporaryDirectory(dir=outdir, prefix=".package.") as tmp:
        top = Path(tmp)
        payload = top / "payload"
        _payload(spec, payload)
        files = "\n".join(f"/{p.relative_to(payload)}" for p in sorted(payload.rglob("*"))
                          if p.is_file())
        post = POSTINST.format(image=spec.image_path).removeprefix("#!/bin/sh\n")
        specfile = top / f"{spec.name}.spec"
        specfile.write_text(RPM_SPEC.format(
            name=spec.name, version=spec.version, release=spec.release, nvr=spec.nvr,
            arch=arch, payload=payload, post=post, files=files))
        run(["rpmbuild", "-bb", "--quiet", "--define", f"_topdir {top}", "--target", arch,
             str(specfile)])
        built = top / "RPMS" / arch / f"{spec.name}-{spec.version}-{spec.release}.{arch}.rpm"
        rpm = outdir / built.name
        shutil.move(built, rpm)
    return rpm


def build(image: str, fmt: str, outdir: Path) -> Path:
    if fmt not in FORMATS:
        die(f"--format {fmt}: not a package format", hint=f"one of: {', '.join(FORMATS)}")
    tool = "dpkg-deb" if fmt == "deb" else "rpmbuild"
    if shutil.which(tool) is None:
        die(f"{tool} is not installed", hint="apt install " +
            ("dpkg" if fmt == "deb" else "rpm"))
    spec = package_spec(image)
    if not outdir.is_dir():
        die(f"{outdir}: no such directory", hint="give an existing output directory")
    return build_deb(spec, outdir) if fmt == "deb" else build_rpm(spec, outdir)
