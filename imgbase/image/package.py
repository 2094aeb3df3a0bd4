"""`imgbase package IMAGE --format deb|rpm`: an image wrapped as an update package.

Sites that roll out software through their package manager get each image as
``<name>-image-update`` (version and release of the image). The package installs the
squashfs with its ``.sha256`` and ``.sha256.sig`` under ``/usr/share/imgbase/images/``.

Nothing in an image is trusted before its signature is checked, on either side:

- Building: IMAGE and its sidecars are copied into a private directory, the copy is
  verified (checksum, and a signature by a key in ``--trusted``), and only then is its
  ``image.json`` read; name, version, release and architecture must match strict patterns
  before they name the package, a path or a line of the deb control file or rpm spec. The
  package is made from that copy, so the file checked is the file packaged.
- Installing: the post-install script copies the image into a fresh private directory
  (``mktemp -d`` under /var/lib/imgbase, mode 0700), verifies the copy with the node's
  *installed* imgbase against the node's trusted keys (signature mandatory), and only then
  runs ``imgbase update`` on that copy with the *new* image's imgbase, unpacked from it: the
  image is as trusted as its signature, so an update can change how updates are done, but
  no code of the image runs before the node's own code has checked it.

"Already up to date" (exit 77) counts as success; any other refusal fails the package
install with imgbase's message. The package lands in the booted layer only: the new layer
comes from the image, so it never carries the package.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImgbaseError, InputError, die
from ..run import run
from .info import image_info
from .naming import Nvr
from .trust import TRUSTED, keyrings, sig_path, sums_path, verify_image

IMAGES = "usr/share/imgbase/images"
FORMATS = ("deb", "rpm")
RPM_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}
DEB_ARCH = {rpm: deb for deb, rpm in RPM_ARCH.items()}
#: where the post-install script makes its private copy of the image (not /run: a tmpfs)
NODE_WORK = "/var/lib/imgbase"

#: image.json key -> what it may hold: what dpkg and rpm both take as it is (no `%`, `$`,
#: quotes, `;`, whitespace or `-` inside version and release), within LVM's 127 characters
FIELDS = {
    "name": (re.compile(r"[a-z0-9][a-z0-9.-]{0,63}"),
             "lower-case letters, digits, '.' and '-' (at most 64)"),
    "version": (re.compile(r"[0-9][A-Za-z0-9.~]{0,31}"),
                "a digit, then letters, digits, '.' and '~' (at most 32)"),
    "release": (re.compile(r"[A-Za-z0-9][A-Za-z0-9.~]{0,31}"),
                "letters, digits, '.' and '~' (at most 32)"),
    "architecture": (re.compile(r"[a-z0-9][a-z0-9_]{0,15}"),
                     "lower-case letters, digits and '_' (at most 16), e.g. amd64"),
}
#: rpmbuild's top directory (in -o DIR) goes into a macro and its build scripts
RPM_PATH = re.compile(r"[A-Za-z0-9._+/-]+")

#: run by the node's installed imgbase: IMAGE is verified against TRUSTED, or it exits 1
VERIFY = """import sys
from pathlib import Path
from imgbase.errors import ImgbaseError
try:
    from imgbase.image.trust import verify_image
except ImportError:  # a node whose imgbase predates imgbase.image
    from imgbase.trust import verify_image
try:
    verdict = verify_image(sys.argv[1], insecure=False, trusted=Path(sys.argv[2]))
except ImgbaseError as exc:
    sys.exit("imgbase: " + exc.oneline())
print("imgbase:", sys.argv[1], verdict.checksum + ",", verdict.signature)
"""

POSTINST = """#!/bin/sh
# verify the image with this node's imgbase and keys, then update with the image's imgbase
set -e
{only_on_configure}image={image}
trusted={trusted}
mkdir -p {workroot}
work=$(mktemp -d {worktemplate})
trap 'rm -rf "$work"' EXIT
trap 'exit 1' HUP INT TERM
copy="$work"/{basename}
cp "$image" "$copy"
cp "$image.sha256" "$copy.sha256"
cp "$image.sha256.sig" "$copy.sha256.sig"
python3 -P -c {verify} "$copy" "$trusted"
unsquashfs -q -n -d "$work/root" "$copy" usr/lib/python3/dist-packages/imgbase >/dev/null
rc=0
PYTHONPATH="$work/root/usr/lib/python3/dist-packages" python3 -P -m imgbase update "$copy" || rc=$?
[ "$rc" -eq 0 ] || [ "$rc" -eq 77 ] || exit "$rc"
"""


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "...")


@dataclass(frozen=True)
class ImageId:
    """What image.json says an image is; refuses (dies) unless every field is safe to
    name a package, a file and a line of a control file or spec as it is."""

    name: str
    version: str
    release: str
    architecture: str  # as image.json has it: Debian's (amd64) or rpm's (x86_64) name

    def __post_init__(self) -> None:
        for key, (pattern, rule) in FIELDS.items():
            value = getattr(self, key)
            if not pattern.fullmatch(value):
                die(f"image.json's {key} {_shown(value)} cannot name a package",
                    hint=f"a package's {key} is {rule}")
        Nvr.check_parts(self.name, self.version, self.release)

    @property
    def nvr(self) -> str:
        return f"{self.name}-{self.version}-{self.release}"

    @classmethod
    def from_json(cls, info: object) -> ImageId:
        if not isinstance(info, dict):
            die(f"image.json is {type(info).__name__}, not an object",
                hint="use an image made by imgbase compose")
        missing = [k for k in (*FIELDS, "nvr") if not isinstance(info.get(k), str)]
        if missing:
            die(f"image.json has no {', '.join(missing)} (as a string)",
                hint="use an image made by imgbase compose")
        ident = cls(info["name"], info["version"], info["release"], info["architecture"])
        if info["nvr"] != ident.nvr:
            die(f"image.json's nvr {_shown(info['nvr'])} is not its "
                f"name-version-release {ident.nvr!r}",
                hint="use an image made by imgbase compose")
        return ident


@dataclass(frozen=True)
class PackageSpec:
    image: ImageId
    files: tuple[Path, ...]  # the verified copies of the image, its .sha256 and .sha256.sig

    @property
    def name(self) -> str:
        return f"{self.image.name}-image-update"

    @property
    def image_path(self) -> str:
        return f"/{IMAGES}/{self.image.nvr}.squashfs"


def postinst(spec: PackageSpec, *, deb: bool) -> str:
    """The post-install script: every value in it through shlex.quote."""
    q = shlex.quote
    return POSTINST.format(
        only_on_configure='[ "$1" = configure ] || exit 0\n' if deb else "",
        image=q(spec.image_path), trusted=q(str(TRUSTED)), workroot=q(NODE_WORK),
        worktemplate=q(f"{NODE_WORK}/package.XXXXXX"),
        basename=q(Path(spec.image_path).name), verify=q(VERIFY))


def _copy(src: Path, dest: Path) -> None:
    try:
        shutil.copyfile(src, dest)
    except (OSError, shutil.Error) as exc:
        raise ImgbaseError(f"cannot copy {src}: {exc}",
                           hint="IMAGE must be readable, and -o DIR have room for a copy") \
            from None


def verified_copy(image: str, dest: Path, trusted: Path) -> Path:
    """IMAGE, its .sha256 and .sha256.sig copied into dest (made here, 0700), and the
    copy verified: checksum and a signature by a key in trusted. The copy is what the
    caller reads and packages, whatever happens to IMAGE meanwhile."""
    src, sums, sig = Path(image), sums_path(image), sig_path(image)
    if not src.exists():
        die(f"{image}: no such image", hint="give the .squashfs made by imgbase compose")
    if not src.is_file():
        die(f"{image} is not a file", hint="give the .squashfs made by imgbase compose")
    if not sums.is_file():
        die(f"{sums} is missing", hint="package the image with the .sha256 compose wrote")
    if not sig.is_file():
        die(f"{image} is not signed: nodes would refuse the package's update",
            hint="imgbase sign IMAGE first")
    if not keyrings(trusted):
        die(f"no trusted keys in {trusted}: the signature of {image} cannot be checked",
            hint="pass --trusted DIR, a directory with the publisher's key "
            "(gpg --export KEY > DIR/site.gpg)")
    dest.mkdir(mode=0o700)
    copy = dest / src.name
    for a, b in ((src, copy), (sums, sums_path(str(copy))), (sig, sig_path(str(copy)))):
        _copy(a, b)
    try:
        verify_image(str(copy), insecure=False, trusted=trusted)
    except InputError as exc:
        die(f"{image} is refused: {exc.message.replace(f'{dest}/', '')}", hint=exc.hint)
    return copy


def read_id(copy: Path, image: str) -> ImageId:
    """The verified copy's image.json, validated (image names it in messages)."""
    try:
        info = image_info(str(copy))
    except InputError as exc:
        die(exc.message.replace(str(copy), image), hint=exc.hint)
    except ValueError as exc:  # not JSON
        die(f"{image}: image.json is not JSON ({exc})",
            hint="use an image made by imgbase compose")
    try:
        return ImageId.from_json(info)
    except InputError as exc:
        die(f"{image}: {exc.message}", hint=exc.hint)


def _payload(spec: PackageSpec, root: Path) -> None:
    """The image and its sidecars, named by the NVR, under root/usr/share/imgbase/images."""
    dest = root / IMAGES
    dest.mkdir(parents=True)
    for src in spec.files:
        suffix = src.name[len(spec.files[0].name):]  # "", ".sha256", ".sha256.sig"
        target = dest / f"{spec.image.nvr}.squashfs{suffix}"
        try:
            os.link(src, target)  # the private copy: no second copy of 250 MB
        except OSError:
            _copy(src, target)
        target.chmod(0o644)


def build_deb(spec: PackageSpec, top: Path) -> Path:
    """The .deb, built in top (private)."""
    arch = DEB_ARCH.get(spec.image.architecture, spec.image.architecture)
    version = f"{spec.image.version}-{spec.image.release}"
    root = top / "root"
    _payload(spec, root)
    (root / "DEBIAN").mkdir()
    size_kib = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) // 1024 + 1
    nvr = spec.image.nvr
    (root / "DEBIAN/control").write_text(
        f"Package: {spec.name}\nVersion: {version}\nArchitecture: {arch}\n"
        "Maintainer: imgbase developers <imgbase@localhost>\n"
        f"Installed-Size: {size_kib}\nSection: admin\nPriority: optional\n"
        "Depends: imgbase, squashfs-tools, python3\n"
        f"Description: update this imgbase node to {nvr}\n"
        f" Installs the {nvr} image, verifies it with this node's imgbase and trusted\n"
        " keys, and runs imgbase update on it: the image becomes the next boot, on\n"
        " trial. Reboot to use it.\n")
    script = root / "DEBIAN/postinst"
    script.write_text(postinst(spec, deb=True))
    script.chmod(0o755)
    deb = top / f"{spec.name}_{version}_{arch}.deb"
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
Installs the {nvr} image, verifies it with this node's imgbase and trusted keys, and
runs imgbase update on it: the image becomes the next boot, on trial. Reboot to use it.

%install
mkdir -p %{{buildroot}}
cp -a {payload}/. %{{buildroot}}/

%post
{post}
%files
{files}
"""


def spec_text(text: str) -> str:
    """Text as rpm reads it back, unexpanded: every `%` doubled."""
    return text.replace("%", "%%")


def check_rpm_top(top: Path) -> None:
    """rpmbuild's top directory goes into a macro and its build scripts as it is."""
    if not RPM_PATH.fullmatch(str(top)):
        die(f"{top.parent}: rpmbuild would build in a path with other characters than "
            "letters, digits and . _ + - /", hint="give another -o DIR")


def build_rpm(spec: PackageSpec, top: Path) -> Path:
    """The .rpm, built in top (private, checked by check_rpm_top)."""
    image = spec.image
    arch = RPM_ARCH.get(image.architecture, image.architecture)
    payload = top / "payload"
    _payload(spec, payload)
    files = "\n".join(f"/{p.relative_to(payload)}" for p in sorted(payload.rglob("*"))
                      if p.is_file())
    specfile = top / f"{spec.name}.spec"
    specfile.write_text(RPM_SPEC.format(
        name=spec.name, version=image.version, release=image.release, nvr=image.nvr,
        arch=arch, payload=spec_text(shlex.quote(str(payload))),
        post=spec_text(postinst(spec, deb=False).removeprefix("#!/bin/sh\n")),
        files=spec_text(files)))
    run(["rpmbuild", "-bb", "--quiet", "--define", f"_topdir {top}", "--target", arch,
         str(specfile)])
    return top / "RPMS" / arch / f"{spec.name}-{image.version}-{image.release}.{arch}.rpm"


def build(image: str, fmt: str, outdir: Path, trusted: Path = TRUSTED) -> Path:
    """The package of IMAGE in outdir; nothing is written there unless all went well."""
    if fmt not in FORMATS:
        die(f"--format {fmt}: not a package format", hint=f"one of: {', '.join(FORMATS)}")
    tool = "dpkg-deb" if fmt == "deb" else "rpmbuild"
    if shutil.which(tool) is None:
        die(f"{tool} is not installed", hint="apt install " +
            ("dpkg" if fmt == "deb" else "rpm"))
    if not outdir.is_dir():
        die(f"{outdir}: no such directory", hint="give an existing output directory")
    with tempfile.TemporaryDirectory(dir=outdir, prefix=".package.") as tmp:
        top = Path(tmp).resolve()
        if fmt == "rpm":
            check_rpm_top(top)
        copy = verified_copy(image, top / "verified", trusted)
        ident = read_id(copy, image)
        spec = PackageSpec(ident, (copy, sums_path(str(copy)), sig_path(str(copy))))
        built = build_deb(spec, top) if fmt == "deb" else build_rpm(spec, top)
        result = outdir / built.name
        os.replace(built, result)
    return result

