"""Anaconda kickstarts for imgbase: node installs from an image, and lorax image builds.

Templates are Jinja2 files in the repository's ``kickstarts/`` directory (``_*.ks.j2``
are partials). Each starts with a header comment naming its kind (``install`` or
``build``), the options it takes and a one-line description::

    {#- kind: install | options: nist | description: explicit thin LVM layout -#}

``imgbase kickstart render`` (install templates) writes a kickstart that installs the
image with ``liveimg --url=… --checksum=…`` and whose ``%post`` makes the install a node
(``imgbase layout --init``, the agent's join config, kernel arguments, SSH keys);
`render_build_kickstart` (the ``build-pxe-live`` template) turns an image spec's layers
into a kickstart for ``livemedia-creator --make-pxe-live``. Every rendered kickstart is
parsed by pykickstart for each syntax version in `syntax_versions` before it is handed
out; a refusal is fatal and nothing is written.

The templates live in the source checkout, not in the imgbase package that images carry:
render kickstarts on the admin's machine, from the repository.

>>> sidecar_digest("%s  node-1.0-1.squashfs\\n" % ("ab" * 32), "node-1.0-1.squashfs")[:8]
'abababab'
>>> sidecar_digest("%s  other.squashfs\\n" % ("ab" * 32), "node-1.0-1.squashfs") is None
True
>>> liveimg_url("http://h/nodes/", "node-1.0-1.squashfs")
'http://h/nodes/node-1.0-1.squashfs'
>>> parse_header("{#- kind: install | options: nist | description: a layout -#}")
{'kind': 'install', 'options': 'nist', 'description': 'a layout'}
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import stat
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import die
from .site import Site, check_url
from .spec import ImageSpec, LayerSpec

if TYPE_CHECKING:
    import jinja2

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "kickstarts"
SUFFIX = ".ks.j2"
DEFAULT_TEMPLATE = "node-thinp"
BUILD_TEMPLATE = "build-pxe-live"
KINDS = ("install", "build")
#: the node's volume group and thin pool in the explicit layout (as imgbase install makes)
VG, POOL = "imgbase", "pool"
ROOT_SIZE_MIB = 8192
#: the largest file or hook a build kickstart embeds (base64 in its %post)
MAX_EMBED = 1 << 20
#: packages a PXE live image needs besides the layers': dracut's live and network modules
PXE_LIVE_PACKAGES = ("dracut-live", "dracut-network")
_HEADER_RE = re.compile(r"^\{#-?\s*(.*?)\s*-?#\}")


# -- templates ------------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    name: str
    path: Path
    kind: str  # "install" | "build"
    options: tuple[str, ...] = ()
    description: str = ""


def parse_header(line: str) -> dict[str, str]:
    """The ``key: value`` pairs of a template's first-line comment (empty if it has none)."""
    m = _HEADER_RE.match(line.strip())
    if not m:
        return {}
    pairs = (part.partition(":") for part in m[1].split(" | "))
    return {k.strip(): v.strip() for k, sep, v in pairs if sep}


def _load_template(path: Path) -> Template:
    try:
        first = path.read_text(encoding="utf-8").partition("\n")[0]
    except FileNotFoundError:
        die(f"{path}: no such kickstart template", hint="imgbase kickstart list shows them")
    except (OSError, UnicodeDecodeError) as exc:
        die(f"{path}: cannot read: {exc}")
    head = parse_header(first)
    kind = head.get("kind", "install")
    if kind not in KINDS:
        die(f"{path}:1: kind {kind!r} is not one of {', '.join(KINDS)}",
            hint="{#- kind: install | description: ... -#} on the first line")
    name = path.name.removesuffix(SUFFIX) if path.name.endswith(SUFFIX) else path.name
    options = tuple(o.strip() for o in head.get("options", "").split(",") if o.strip())
    return Template(name, path, kind, options, head.get("description", ""))


def template_dir() -> Path:
    if not TEMPLATE_DIR.is_dir():
        die(f"kickstart templates not found at {TEMPLATE_DIR}",
            hint="render kickstarts from a checkout of the imgbase repository (the package "
            "in node images carries no templates)")
    return TEMPLATE_DIR


def templates() -> list[Template]:
    """The repository's templates, by name (partials, ``_*``, left out)."""
    return [_load_template(p) for p in sorted(template_dir().glob(f"*{SUFFIX}"))
            if not p.name.startswith("_")]


def find_template(name: str | None) -> Template:
    """A template by name (``node-explicit``), file name, or path to a template file."""
    name = name or DEFAULT_TEMPLATE
    if "/" in name or (name.endswith(SUFFIX) and Path(name).is_file()):
        return _load_template(Path(name))
    known = {t.name: t for t in templates()}
    found = known.get(name.removesuffix(SUFFIX))
    if found is None:
        die(f"no kickstart template {name!r}",
            hint=f"known: {', '.join(known)}; or give the path of a template file")
    return found


def _environment(template: Template) -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(template.path.parent), str(template_dir())]),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True, autoescape=False)
    env.filters["sh"] = lambda value: shlex.quote(str(value))
    return env


def _render(template: Template, context: dict[str, Any]) -> str:
    import jinja2

    try:
        text: str = _environment(template).get_template(template.path.name).render(
            template=template.name, syntax_versions=syntax_versions(), **context)
    except jinja2.TemplateSyntaxError as exc:
        die(f"{exc.filename or template.path}:{exc.lineno}: template syntax: {exc.message}",
            hint="see https://jinja.palletsprojects.com/templates/")
    except jinja2.TemplateError as exc:
        die(f"{template.path}: template error: {exc}",
            hint=f"the variables a {template.kind} template gets are in docs/kickstart.md")
    return text


# -- validation -------------------------------------------------------------------

def syntax_versions() -> tuple[str, ...]:
    """The kickstart syntax versions every rendered kickstart must pass: Fedora 39, the
    newest Fedora this pykickstart knows, RHEL 9 and RHEL 10 (when it knows them)."""
    from pykickstart.version import versionMap

    fedoras = sorted((k for k in versionMap if re.fullmatch(r"F\d+", k)),
                     key=lambda k: int(k[1:]))
    wanted = ("F39", fedoras[-1], "RHEL9", "RHEL10")
    return tuple(dict.fromkeys(v for v in wanted if v in versionMap))


def validate(text: str, source: str) -> tuple[str, ...]:
    """Parse ``text`` with pykickstart for every syntax version; die on the first refusal
    (errors, and deprecation warnings, are fatal). Return the versions checked."""
    from pykickstart.errors import KickstartError, KickstartParseWarning
    from pykickstart.parser import KickstartParser
    from pykickstart.version import makeVersion

    versions = syntax_versions()
    for version in versions:
        parser = KickstartParser(makeVersion(version), errorsAreFatal=True,
                                 followIncludes=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", KickstartParseWarning)
            try:
                parser.readKickstartFromString(text)
            except (KickstartError, KickstartParseWarning) as exc:
                die(f"{source}: pykickstart ({version} syntax) refuses the rendered "
                    f"kickstart: {exc}",
                    hint="line numbers count lines of the rendered kickstart; fix the "
                    "template or the value that went into that line")
    return versions


# -- install kickstarts -------------------------------------------------------------

def sidecar_digest(text: str, name: str) -> str | None:
    """The sha256 a ``sha256sum``-style file gives for ``name``, if it names it."""
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and words[1].lstrip("*") == name \
                and re.fullmatch(r"[0-9a-f]{64}", words[0]):
            return words[0]
    return None


def image_checksum(image: Path) -> str:
    """sha256 of the image, read from the image itself. A sidecar (``IMG.sha256``, or
    ``<nvr>.sha256`` as compose writes it) that names the image must agree: one that does
    not is stale or was tampered with, and is refused."""
    from .trust import sha256_of

    digest = sha256_of(str(image))
    for sums in (Path(f"{image}.sha256"), image.with_suffix(".sha256")):
        if sums.is_file():
            said = sidecar_digest(sums.read_text(errors="replace"), image.name)
            if said is not None and said != digest:
                die(f"{sums} gives {image.name} the sha256 {said[:12]}..., but the image's "
                    f"is {digest[:12]}...",
                    hint="the sidecar is stale or was tampered with: compose or download "
                    "the image and its .sha256 again")
    return digest


def check_liveimg(text: str, url: str, checksum: str, source: str) -> None:
    """The rendered kickstart, parsed back, installs ``url`` with ``checksum``: a template
    (a site's own, say) or a value that drops or changes either is refused."""
    from pykickstart.parser import KickstartParser
    from pykickstart.version import makeVersion

    handler = makeVersion(syntax_versions()[-1])
    KickstartParser(handler, errorsAreFatal=True, followIncludes=False
                    ).readKickstartFromString(text)
    got = (handler.liveimg.url, handler.liveimg.checksum) if handler.liveimg.seen else None
    if got != (url, checksum):
        die(f"{source}: the rendered kickstart's liveimg is {got!r}, not the image's URL "
            f"and sha256 ({url}, {checksum[:12]}...)",
            hint="an install template renders liveimg --url={{ url }} "
            "--checksum={{ checksum }} (kickstarts/_node-head.ks.j2)")


def liveimg_url(url: str, image_name: str) -> str:
    """The image's URL: ``url`` itself, or ``url`` + the image's file name when ``url``
    is a directory (ends in ``/``)."""
    return url + image_name if url.endswith("/") else url


@dataclass(frozen=True)
class Volume:
    mount: str
    lv: str
    size_mib: int


def explicit_volumes(nist: bool) -> tuple[Volume, ...]:
    """The thin volumes of the explicit layout: those of ``imgbase install --volumes``.

    >>> [v.mount for v in explicit_volumes(False)]
    ['/var']
    >>> explicit_volumes(True)[1]
    Volume(mount='/var/log', lv='var_log', size_mib=2048)
    """
    from .install import VOLUME_PROFILES

    rows = VOLUME_PROFILES["nist" if nist else "minimal"]
    return tuple(Volume(mount, lv, int(size.removesuffix("G")) * 1024)
                 for mount, lv, size in rows)


def render_install(template: Template, *, image: Path | None, url: str | None,
                   site: Site, nist: bool = False) -> str:
    """A node install kickstart from an install template, validated."""
    from . import __version__
    from .compose.postprocess import IMAGE_JSON
    from .storage.layout import MOUNT_TAG
    from .storage.lvm import TAG_VOLUME

    if template.kind != "install":
        die(f"{template.name} is a {template.kind} template: it renders from an image spec",
            hint=f"imgbase kickstart render {template.name} --image-spec IMAGE.toml")
    if nist and "nist" not in template.options:
        die(f"{template.name} has no NIST layout (--nist)",
            hint="the explicit layout has it: imgbase kickstart render node-explicit --nist")
    if image is not None and not image.is_file():
        die(f"{image}: no such image", hint="give the .squashfs made by imgbase compose")
    if image is None:
        die("a liveimg without a checksum installs whatever the URL serves",
            hint="give --image IMG.squashfs: its sha256 goes into the kickstart")
    source = url or site.image_url
    if source is None:
        die("anaconda needs the image's URL for liveimg",
            hint="--url http://.../IMG.squashfs, or image_url in the site file")
    source = check_url(liveimg_url(source, image.name), "--url" if url else "image_url")
    served = PurePosixPath(urlsplit(source).path).name
    if served != image.name:
        die(f"the URL serves {served!r}, but the checksum is of {image.name!r}",
            hint="give the URL of this image")
    checksum = image_checksum(image)
    volumes = explicit_volumes(nist)
    context = {
        "imgbase_version": __version__, "image_name": image.name,
        "url": source, "checksum": checksum, "site": site, "nist": nist,
        "agent_toml": site.cluster.agent_toml() if site.cluster else None,
        "vg": VG, "pool": POOL, "root_size": ROOT_SIZE_MIB, "volumes": volumes,
        "tagged_volumes": [v for v in volumes if v.mount != "/var"],
        "tag_volume": TAG_VOLUME, "mount_tag": MOUNT_TAG, "image_json_path": "/" + IMAGE_JSON,
    }
    text = _render(template, context)
    validate(text, str(template.path))
    check_liveimg(text, source, checksum, str(template.path))
    return text


# -- build kickstarts -----------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One path of a layer's files/ tree, as the %post recreates it (owner root)."""

    kind: str  # "dir" | "file" | "link"
    path: str  # absolute, in the image
    mode: str = "0755"  # octal, for dir and file
    data: tuple[str, ...] = ()  # base64 lines, for file
    target: str = ""  # for link


@dataclass(frozen=True)
class Hook:
    name: str
    data: tuple[str, ...]  # base64 lines


@dataclass(frozen=True)
class LayerPost:
    """What the build kickstart's %post does for one layer, in compose's order."""

    name: str
    entries: tuple[Entry, ...]
    hooks: tuple[Hook, ...]
    enable: tuple[str, ...]
    disable: tuple[str, ...]
    mask: tuple[str, ...]


def b64_lines(data: bytes) -> tuple[str, ...]:
    """base64 in 76-character lines, for a here-document.

    >>> b64_lines(b"hello")
    ('aGVsbG8=',)
    """
    return tuple(base64.encodebytes(data).decode().splitlines())


def _embed(layer: LayerSpec, what: str, path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_EMBED:
        die(f"layer {layer.name!r}: {what} {path} is {size} bytes; a build kickstart embeds "
            f"up to {MAX_EMBED} bytes in its %post",
            hint="ship it in a package, or compose the image with imgbase compose")
    return path.read_bytes()


def layer_entries(layer: LayerSpec) -> tuple[Entry, ...]:
    """The layer's files/ tree as %post entries; what a kickstart cannot carry (device
    nodes, FIFOs, sockets, large files) is refused, naming the layer and the path."""
    if not layer.files:
        return ()
    entries = []
    for src in sorted(layer.files.rglob("*")):
        dest = "/" + src.relative_to(layer.files).as_posix()
        st = src.lstat()
        mode = f"{stat.S_IMODE(st.st_mode):04o}"
        if stat.S_ISLNK(st.st_mode):
            entries.append(Entry("link", dest, target=os.readlink(src)))
        elif stat.S_ISDIR(st.st_mode):
            entries.append(Entry("dir", dest, mode))
        elif stat.S_ISREG(st.st_mode):
            entries.append(Entry("file", dest, mode,
                                 b64_lines(_embed(layer, "file", src))))
        else:
            die(f"layer {layer.name!r}: files/ holds {src}, a special file (device, FIFO or "
                "socket) that a kickstart cannot create",
                hint="create it in a hook (mknod, mkfifo), or compose with imgbase compose")
    return tuple(entries)


def layer_post(layer: LayerSpec) -> LayerPost:
    hooks = tuple(Hook(h.name, b64_lines(_embed(layer, "hook", h))) for h in layer.hooks)
    s = layer.services
    return LayerPost(layer.name, layer_entries(layer), hooks, s.enable, s.disable, s.mask)


def build_image_json(image: ImageSpec) -> str:
    """/usr/lib/imgbase/image.json as imgbase compose writes it."""
    from .compose.build import inputs_digest
    from .compose.postprocess import identity

    info = identity(image, inputs_digest(image))
    info["layers"] = [layer.name for layer in image.layers]
    return json.dumps(info, indent=2, sort_keys=True) + "\n"


def render_build(template: Template, image: ImageSpec, repo_urls: tuple[str, ...] = ()) -> str:
    """A build kickstart from a build template, validated."""
    from .compose.postprocess import FACTORY_ETC, IMAGE_JSON

    if template.kind != "build":
        die(f"{template.name} is an {template.kind} template: it renders from an image",
            hint=f"imgbase kickstart render {template.name} --image IMG.squashfs --url URL")
    where = f"{image.path}"
    # repos came to ImageSpec with the dnf backend; an older spec has none
    repos = tuple(repo_urls) or tuple(getattr(image, "repos", ()))
    if not repos:
        die(f"{where}: a build kickstart needs package repositories",
            hint="pass repo_urls (imgbase kickstart render build-pxe-live --repo URL), or "
            "repos = [...] in [image]")
    for url in repos:
        check_url(url, "repository")
    if not getattr(image, "bootable", True):
        die(f"{where}: bootable = false, but a PXE live image boots",
            hint="drop bootable = false from [image]")
    packages = list(image.packages)
    if any(layer.imgbase_package for layer in image.layers) and "imgbase" not in packages:
        packages.append("imgbase")
    if "imgbase" not in packages:
        die(f"{where}: no layer installs imgbase, and the build kickstart's %post runs "
            "imgbase's post-processing inside the image",
            hint="add a layer with imgbase_package = true (the agent layer), or the "
            "package imgbase from one of the repositories")
    packages += [p for p in PXE_LIVE_PACKAGES if p not in packages]
    context = {
        "image": image, "nvr": str(image.nvr), "repos": repos, "packages": packages,
        "kernel_args": " ".join(image.kernel_args), "root_size": ROOT_SIZE_MIB,
        "layers": [layer_post(layer) for layer in image.layers],
        "image_json": build_image_json(image), "image_json_path": "/" + IMAGE_JSON,
        "factory_etc": "/" + FACTORY_ETC,
    }
    text = _render(template, context)
    validate(text, f"{template.path} (image {image.path})")
    return text


def render_build_kickstart(image: ImageSpec, repo_urls: tuple[str, ...] = ()) -> str:
    """The ``build-pxe-live`` kickstart of an image spec, for ``livemedia-creator
    --make-pxe-live``: the packages of every layer (from ``repo_urls``, else the image's
    repos), kernel arguments as ``bootloader --append``, and a %post that applies each
    layer's files, hooks and services in order, then imgbase's post-processing inside the
    image. Validated with pykickstart; bad input dies (InputError)."""
    return render_build(find_template(BUILD_TEMPLATE), image, repo_urls)


# -- output ---------------------------------------------------------------------------

def write_output(text: str, out: str | None) -> None:
    """Print the kickstart, or write it to ``out`` whole (a temporary file renamed)."""
    if out is None or out == "-":
        sys.stdout.write(text)
        return
    path = Path(out)
    if path.is_dir():
        die(f"{out} is a directory", hint="give the kickstart's file name, e.g. -o node.ks")
    if not path.parent.is_dir():
        die(f"{path.parent}: no such directory", hint="create it, or write elsewhere with -o")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- the command ------------------------------------------------------------------------

def list_lines() -> list[str]:
    """``imgbase kickstart list``: one line per template."""
    found = templates()
    width = max(len(t.name) for t in found)
    return [f"{t.name:<{width}}  {t.kind:<7}  {t.description}"
            + (" (default)" if t.name == DEFAULT_TEMPLATE else "") for t in found]


def render_command(name: str | None, *, image: str | None = None, url: str | None = None,
                   site_file: str | None = None,
                   nist: bool = False, endpoints: list[str] | None = None,
                   group: str | None = None, kernel_args: list[str] | None = None,
                   ssh_keys: list[str] | None = None, image_spec: str | None = None,
                   repos: list[str] | None = None) -> str:
    """``imgbase kickstart render``: the kickstart text (validated), or die."""
    from .site import load_site

    template = find_template(name)
    install_flags = {"--image": image, "--url": url, "--site": site_file, "--nist": nist,
                     "--endpoint": endpoints, "--group": group, "--karg": kernel_args,
                     "--ssh-key": ssh_keys}
    if template.kind == "build":
        given = [flag for flag, value in install_flags.items() if value]
        if given:
            die(f"{', '.join(given)}: for install templates, not {template.name}",
                hint=f"imgbase kickstart render {template.name} --image-spec IMAGE.toml "
                "[--repo URL]")
        if not image_spec:
            die(f"{template.name} renders from an image spec",
                hint=f"imgbase kickstart render {template.name} --image-spec IMAGE.toml")
        from .spec import load_image

        return render_build(template, load_image(Path(image_spec)), tuple(repos or ()))
    if image_spec or repos:
        die(f"--image-spec and --repo go with build templates, not {template.name}",
            hint=f"imgbase kickstart render {BUILD_TEMPLATE} --image-spec IMAGE.toml")
    site = load_site(Path(site_file)) if site_file else Site()
    site = site.override(endpoints=endpoints, group=group, kernel_args=kernel_args,
                         ssh_keys=ssh_keys)
    return render_install(template, image=Path(image) if image else None, url=url, site=site,
                          nist=nist)
