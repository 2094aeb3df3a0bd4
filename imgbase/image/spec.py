"""Image and layer definitions: TOML files -> frozen dataclasses.

A layer (``layers/<name>.toml``) lists packages, services, kernel arguments and
ordered hook scripts; a directory ``layers/<name>/files/`` next to it, when it
exists, is copied over the root tree. An image (``images/<name>.toml``) names
the distribution, the mirror and the ordered layers. Unknown keys, wrong types
and duplicates are errors that name the file and line; nothing is dropped.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import intree
from ..errors import ImgbaseError, die
from ..tomlconf import Source, Table
from .kargs import check_arg
from .naming import Nvr

PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
UNIT_RE = re.compile(r"^[A-Za-z0-9:_.\\@-]+$")
LAYER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
REPO_URL_RE = re.compile(r"^(?:https?|ftp|file)://\S+$")
#: a Debian mirror goes into a sources line: no space (a second field), no brackets
#: (options such as [trusted=yes]), no quotes
MIRROR_RE = re.compile(r"(?:https?|file)://[^\s\[\]\"'`#]+")
#: suite, distribution, architecture: one plain word (bookworm, 40, amd64, x86_64)
WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
#: a Debian kernel flavour: linux-image-<flavour> (amd64: the generic, signed kernel)
KERNEL_FLAVOUR_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
#: a directory of the kernel's modules, relative to /usr/lib/modules/<version>/kernel
MODULE_DIR_RE = re.compile(r"[a-z0-9_][a-z0-9_.-]*(?:/[a-z0-9_][a-z0-9_.-]*)*")
COMPRESSIONS = {"zstd": range(1, 23), "xz": range(0, 1), "gzip": range(1, 10), "lz4": range(0, 1)}


# -- layers ---------------------------------------------------------------------

@dataclass(frozen=True)
class Services:
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    mask: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerSpec:
    name: str
    path: Path
    description: str = ""
    packages: tuple[str, ...] = ()
    imgbase_package: bool = False
    services: Services = field(default_factory=Services)
    kernel_args: tuple[str, ...] = ()
    hooks: tuple[Path, ...] = ()
    files: Path | None = None
    #: the kernel flavour this layer brings (Debian: package linux-image-<kernel>)
    kernel: str | None = None
    #: module directories (under .../kernel/) a node never loads, left out of the image
    kernel_modules_exclude: tuple[str, ...] = ()

    @property
    def all_packages(self) -> tuple[str, ...]:
        """packages, and the kernel package first when the layer sets a kernel."""
        return ((f"linux-image-{self.kernel}",) if self.kernel else ()) + self.packages

    def digest(self) -> str:
        """sha256 over everything this layer feeds into a build."""
        h = hashlib.sha256()
        h.update(self.path.read_bytes())
        for hook in self.hooks:
            h.update(b"hook\0" + hook.name.encode() + b"\0" + hook.read_bytes())
        if self.files:
            h.update(tree_digest(self.files).encode())
        return h.hexdigest()


def tree_digest(root: Path) -> str:
    """sha256 over a directory tree: paths, modes, link targets and contents."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]):
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            h.update(f"{rel}\0{st.st_mode:o}\0".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            else:
                h.update(p.read_bytes())
        for d in dirnames:
            h.update(f"{Path(dirpath, d).relative_to(root).as_posix()}/\0".encode())
    return h.hexdigest()


def load_layer(path: Path) -> LayerSpec:
    src = Source(path)
    Table(src, "", src.data, {"layer", "services"})  # rejects unknown top-level tables
    if "layer" not in src.data:
        die(f"{path}:1: a layer file needs a [layer] table", hint="see docs/layers.md")
    t = Table(src, "layer", src.data["layer"],
               {"name", "description", "packages", "imgbase_package", "kernel_args", "hooks",
                "kernel", "kernel_modules_exclude"})
    name = t.get("name", str, required=True)
    if not LAYER_NAME_RE.fullmatch(name):
        src.fail("layer", "name", f"layer name {name!r} must be lower-case letters, digits, '-'")
    if name != path.stem:
        src.fail("layer", "name", f"layer name {name!r} differs from its file name {path.name!r}",
                 hint=f"rename the file to {name}.toml or the layer to {path.stem!r}")
    layer_dir = path.parent / name
    if layer_dir.is_symlink():
        src.fail("layer", "name", f"the layer directory {layer_dir} is a symlink",
                 hint="a layer's hooks and files live in its own directory")
    hooks = tuple(_hook(src, layer_dir, rel) for rel in t.strings("hooks"))
    services = Services()
    if "services" in src.data:
        s = Table(src, "services", src.data["services"], {"enable", "disable", "mask"})
        services = Services(
            s.strings("enable", UNIT_RE), s.strings("disable", UNIT_RE), s.strings("mask", UNIT_RE)
        )
        both = set(services.enable) & (set(services.disable) | set(services.mask))
        if both:
            src.fail("services", None, f"services both enabled and disabled/masked: {sorted(both)}")
    kargs = t.strings("kernel_args")
    for karg in kargs:
        try:
            check_arg(karg)  # the one gate of imgbase kargs, update and the entry writers
        except ImgbaseError as exc:
            src.fail("layer", "kernel_args", exc.message, hint=exc.hint)
    kernel = t.get("kernel", str, None)
    if kernel is not None and not KERNEL_FLAVOUR_RE.fullmatch(kernel):
        src.fail("layer", "kernel", f"kernel flavour {kernel!r} is not one plain word",
                 hint='a Debian kernel flavour: "amd64" (generic, signed), "cloud-amd64"')
    packages = t.strings("packages", PACKAGE_RE)
    if kernel is not None and (listed := [p for p in packages if p.startswith("linux-image-")]):
        src.fail("layer", "packages", f"the layer sets kernel = {kernel!r} and also lists "
                 f"{listed[0]}", hint="name the kernel once: the kernel setting")
    exclude = t.strings("kernel_modules_exclude", MODULE_DIR_RE, "module directory",
                        hint='directories under the kernel\'s modules, e.g. "sound"')
    if any(".." in e.split("/") for e in exclude):
        src.fail("layer", "kernel_modules_exclude", "a module directory cannot contain '..'")
    files = _files(src, layer_dir)
    return LayerSpec(
        name=name,
        path=path.resolve(),
        description=t.get("description", str, ""),
        packages=packages,
        imgbase_package=t.get("imgbase_package", bool, False),
        services=services,
        kernel_args=kargs,
        hooks=hooks,
        files=files,
        kernel=kernel,
        kernel_modules_exclude=exclude,
    )


def _hook(src: Source, layer_dir: Path, rel: str) -> Path:
    """A hook: a regular file in the layer's directory, found there (a symlink may point
    within the directory, never out of it)."""
    try:
        intree.parts(rel)
        if "\n" in rel:
            raise intree.NotInside(f"{rel!r} has a newline")
    except intree.NotInside as exc:
        src.fail("layer", "hooks", f"hook {rel!r}: {exc.message}",
                 hint=f"hooks are paths relative to {layer_dir}, e.g. hooks/10-setup.sh")
    hook = (layer_dir / rel).resolve()
    if not hook.is_relative_to(layer_dir.resolve()):
        src.fail("layer", "hooks", f"hook {rel!r} leads out of {layer_dir} (to {hook})",
                 hint="a hook is a file of the layer's directory")
    if not hook.is_file():
        src.fail("layer", "hooks", f"hook {rel!r} not found at {hook}")
    return hook


def _files(src: Source, layer_dir: Path) -> Path | None:
    """The layer's files/ tree: a real directory of directories, regular files and
    symlinks (copied as links), or None."""
    files = layer_dir / "files"
    if files.is_symlink():
        src.fail("layer", None, f"{files} is a symlink",
                 hint="files/ is copied into the image: it must be a directory of the layer")
    if not files.is_dir():
        return None
    for dirpath, dirnames, filenames in os.walk(files):
        for name in dirnames + filenames:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                src.fail("layer", None, f"layer {layer_dir.name!r}: files/ holds "
                         f"{os.path.join(dirpath, name)}, a special file (device, FIFO or "
                         "socket)", hint="files/ holds directories, files and symlinks; "
                         "create it in a hook (mknod, mkfifo)")
    return files.resolve()


# -- images ---------------------------------------------------------------------

@dataclass(frozen=True)
class ImageSpec:
    path: Path
    name: str
    version: str
    release: str
    distro: str
    suite: str
    architecture: str
    mirror: str
    security_mirror: str
    backend: str
    layers: tuple[LayerSpec, ...]
    source_date_epoch: int
    compression: str = "zstd"
    compression_level: int = 3
    #: rpm backends (dnf): repository baseurls ($releasever/$basearch expand), signing
    repos: tuple[str, ...] = ()
    gpgkeys: tuple[str, ...] = ()
    unsigned: bool = False
    #: false: no kernel, no boot check (test images, rpm trees)
    bootable: bool = True

    @property
    def nvr(self) -> Nvr:
        return Nvr(self.name, self.version, self.release)

    @property
    def packages(self) -> tuple[str, ...]:
        """All packages of all layers, in layer order, without repeats."""
        seen: dict[str, None] = {}
        for layer in self.layers:
            seen.update(dict.fromkeys(layer.all_packages))
        return tuple(seen)

    def layer_of_package(self, package: str) -> LayerSpec | None:
        return next((lay for lay in self.layers if package in lay.all_packages), None)

    @property
    def kernel_args(self) -> tuple[str, ...]:
        return tuple(a for layer in self.layers for a in layer.kernel_args)

    @property
    def kernel_modules_exclude(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e for layer in self.layers
                                   for e in layer.kernel_modules_exclude))


def load_image(path: Path, layer_dir: Path | None = None,
               overrides: dict[str, Any] | None = None) -> ImageSpec:
    """Load an image definition and its layers (from ``layer_dir``, default ../layers)."""
    src = Source(path)
    Table(src, "", src.data, {"image"})
    if "image" not in src.data:
        die(f"{path}:1: an image file needs an [image] table", hint="see images/node.toml")
    data = dict(src.data["image"])
    data.update(overrides or {})
    t = Table(src, "image", data, {
        "name", "version", "release", "distro", "suite", "architecture", "mirror",
        "security_mirror", "backend", "layers", "layer_dir", "source_date_epoch",
        "compression", "compression_level", "repos", "gpgkeys", "unsigned", "bootable",
    })
    name = t.get("name", str, required=True)
    version = t.get("version", str, required=True)
    release = t.get("release", str, "1")
    try:
        Nvr.check_parts(name, version, release)
    except ImgbaseError as exc:
        src.fail("image", "version", exc.message, hint=exc.hint)
    if layer_dir is None:
        layer_dir = (path.parent / t.get("layer_dir", str, "../layers")).resolve()
    layers = []
    for lname in t.strings("layers", LAYER_NAME_RE):
        lpath = layer_dir / f"{lname}.toml"
        if not lpath.is_file():
            known = ", ".join(sorted(p.stem for p in layer_dir.glob("*.toml")))
            src.fail("image", "layers", f"layer {lname!r} not found at {lpath}",
                     hint=f"layers available: {known}")
        layers.append(load_layer(lpath))
    if not layers:
        src.fail("image", "layers", "an image needs at least one layer")
    kernels = [lay for lay in layers if lay.kernel]
    if len(kernels) > 1:
        src.fail("image", "layers", f"layers {kernels[0].name!r} and {kernels[1].name!r} both "
                 "set a kernel", hint="one layer of an image sets kernel = ...")
    listed = [(lay.name, p) for lay in layers for p in lay.packages
              if p.startswith("linux-image-")]
    if kernels and listed:
        src.fail("image", "layers", f"layer {kernels[0].name!r} sets kernel = "
                 f"{kernels[0].kernel!r} and layer {listed[0][0]!r} lists {listed[0][1]}: "
                 "two kernels", hint="name the kernel once: the kernel setting")
    distro = _word(src, t, "distro", "debian")
    if kernels and distro != "debian":
        src.fail("image", "layers", f"layer {kernels[0].name!r} sets a Debian kernel flavour "
                 f"in a {distro} image", hint="list the distribution's kernel package instead")
    compression = t.get("compression", str, "zstd")
    if compression not in COMPRESSIONS:
        src.fail("image", "compression", f"compression {compression!r} is not one of "
                 f"{', '.join(COMPRESSIONS)}")
    level = t.get("compression_level", int, 3)
    levels = COMPRESSIONS[compression]
    if len(levels) > 1 and level not in levels:
        src.fail("image", "compression_level",
                 f"{compression} level {level} is outside {levels.start}..{levels.stop - 1}")
    sde = t.get("source_date_epoch", int, 0)
    if "SOURCE_DATE_EPOCH" in os.environ:
        try:
            sde = int(os.environ["SOURCE_DATE_EPOCH"])
        except ValueError:
            die("SOURCE_DATE_EPOCH must be an integer (seconds since 1970)")
    if sde <= 0:
        src.fail("image", "source_date_epoch", "source_date_epoch must be set (seconds since 1970)",
                 hint="set it in the image file or the SOURCE_DATE_EPOCH environment variable")
    repos, gpgkeys, unsigned = _repositories(src, t)
    return ImageSpec(
        path=path.resolve(),
        name=name,
        version=version,
        release=release,
        distro=distro,
        suite=_word(src, t, "suite", "bookworm"),
        architecture=_word(src, t, "architecture", "amd64"),
        mirror=_mirror(src, t, "mirror", "http://deb.debian.org/debian"),
        security_mirror=_mirror(src, t, "security_mirror",
                                "http://deb.debian.org/debian-security"),
        backend=t.get("backend", str, "mmdebstrap"),
        layers=tuple(layers),
        source_date_epoch=sde,
        compression=compression,
        compression_level=level,
        repos=repos,
        gpgkeys=gpgkeys,
        unsigned=unsigned,
        bootable=t.get("bootable", bool, True),
    )


def _word(src: Source, t: Table, key: str, default: str) -> str:
    value: str = t.get(key, str, default)
    if not WORD_RE.fullmatch(value):
        src.fail("image", key, f"{key} {value!r} is not one plain word",
                 hint="letters, digits, '.', '_', '+', '-' (e.g. bookworm, 40, amd64)")
    return value


def _mirror(src: Source, t: Table, key: str, default: str) -> str:
    value: str = t.get(key, str, default)
    if not MIRROR_RE.fullmatch(value):
        src.fail("image", key, f"{key} {value!r} is not one http, https or file URL",
                 hint="no spaces, newlines, brackets ([trusted=yes] is not taken), quotes "
                 "or '#'; e.g. http://deb.debian.org/debian")
    return value


def _repositories(src: Source, t: Table) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """repos, gpgkeys and unsigned: URLs, and either keys or an explicit unsigned = true."""
    repos, gpgkeys = (t.strings(k, REPO_URL_RE, "URL", hint="http, https, ftp or file URLs, "
                                "e.g. file:///srv/repo or https://mirror/fedora/$releasever/")
                      for k in ("repos", "gpgkeys"))
    unsigned = t.get("unsigned", bool, False)
    if (gpgkeys or unsigned) and not repos:
        src.fail("image", "gpgkeys" if gpgkeys else "unsigned",
                 "'gpgkeys' and 'unsigned' describe 'repos', and no repos are given",
                 hint='add repos = ["https://..."] (baseurls for the dnf backend)')
    if gpgkeys and unsigned:
        src.fail("image", "unsigned", "'unsigned = true' and 'gpgkeys' contradict each other",
                 hint="signed repositories: gpgkeys; local test repositories: unsigned = true")
    return repos, gpgkeys, unsigned
