"""The kickstart language of imgbase: the Jinja2 templates in the repository's
``kickstarts/`` directory (``_*.ks.j2`` are partials), their validation with pykickstart,
and the build kickstart lorax composes from.

Each template starts with a header comment naming its kind (``install`` or ``build``), the
options it takes and a one-line description::

    {#- kind: install | options: nist | description: explicit thin LVM layout -#}

`render_build_kickstart` (the ``build-pxe-live`` template) turns an image spec's layers
into a kickstart for ``livemedia-creator --make-pxe-live``. Every rendered kickstart is
parsed by pykickstart for each syntax version in `syntax_versions` before it is handed
out; a refusal is fatal and nothing is written. Install kickstarts are rendered by
:mod:`imgbase.kickstart.render` on these same templates.

The templates live in the source checkout (and a wheel's package data), not in the imgbase
package that images carry: render kickstarts on the admin's machine.

>>> check_url("http://h/x y.squashfs", "--url")
Traceback (most recent call last):
...
imgbase.errors.InputError: --url: 'http://h/x y.squashfs' is not a URL anaconda can fetch
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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import die
from ..image.spec import ImageSpec, LayerSpec
from ..resources import KICKSTARTS

if TYPE_CHECKING:
    import jinja2

TEMPLATE_DIR = KICKSTARTS
SUFFIX = ".ks.j2"
DEFAULT_TEMPLATE = "node-thinp"
BUILD_TEMPLATE = "build-pxe-live"
KINDS = ("install", "build")
#: the largest file or hook a build kickstart embeds (base64 in its %post)
MAX_EMBED = 1 << 20
#: packages a PXE live image needs besides the layers': dracut's live and network modules
PXE_LIVE_PACKAGES = ("dracut-live", "dracut-network")
_HEADER_RE = re.compile(r"^\{#-?\s*(.*?)\s*-?#\}")

URL_SCHEMES = ("http", "https", "ftp", "file")
#: the root LV of a kickstart's node (MiB)
ROOT_SIZE_MIB = 8192


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
            hint="render kickstarts from a checkout or an installed imgbase wheel (the "
            "imgbase in node images carries no templates)")
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


def render_template(template: Template, context: dict[str, Any]) -> str:
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


# -- URLs -------------------------------------------------------------------------

URL_RE = re.compile(r"^[A-Za-z0-9\-._~:/?\[\]@!$&()*+,;=%]+$")


def check_url(url: str, where: str) -> str:
    """A URL anaconda can fetch, that stands on a kickstart line as one word and is read
    back whole: no fragment, whitespace, quotes, backslash, control or non-ASCII character,
    and % only in an escape (%2F)."""
    try:
        parts = urlsplit(url) if URL_RE.match(url) else None
    except ValueError:  # e.g. an unclosed [ in the host
        parts = None
    if parts is None or re.search(r"%(?![0-9A-Fa-f]{2})", url) \
            or parts.scheme not in URL_SCHEMES \
            or not (parts.netloc or parts.scheme == "file") or not parts.path:
        die(f"{where}: {url!r} is not a URL anaconda can fetch",
            hint=f"a {', '.join(URL_SCHEMES)} URL without a #fragment, spaces, quotes or "
            "backslashes (escape them: %23, %20)")
    return url


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
    from ..compose.build import inputs_digest
    from ..compose.postprocess import identity

    info = identity(image, inputs_digest(image))
    info["layers"] = [layer.name for layer in image.layers]
    return json.dumps(info, indent=2, sort_keys=True) + "\n"


def render_build(template: Template, image: ImageSpec, repo_urls: tuple[str, ...] = ()) -> str:
    """A build kickstart from a build template, validated."""
    from ..compose.postprocess import FACTORY_ETC, IMAGE_JSON

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
    text = render_template(template, context)
    validate(text, f"{template.path} (image {image.path})")
    return text


def render_build_kickstart(image: ImageSpec, repo_urls: tuple[str, ...] = ()) -> str:
    """The ``build-pxe-live`` kickstart of an image spec, for ``livemedia-creator
    --make-pxe-live``: the packages of every layer (from ``repo_urls``, else the image's
    repos), kernel arguments as ``bootloader --append``, and a %post that applies each
    layer's files, hooks and services in order, then imgbase's post-processing inside the
    image. Validated with pykickstart; bad input dies (InputError)."""
    return render_build(find_template(BUILD_TEMPLATE), image, repo_urls)
