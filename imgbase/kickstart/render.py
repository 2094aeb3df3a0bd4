"""Anaconda kickstarts that install a node from an image (``imgbase kickstart render``).

An install kickstart installs the image with ``liveimg --url=… --checksum=…``, and its
``%post`` makes the install a node (``imgbase layout --init``, the agent's join config,
kernel arguments, SSH keys). The templates, their validation and the build kickstart are
:mod:`imgbase.compose.kickstart`'s.

>>> sidecar_digest("%s  node-1.0-1.squashfs\\n" % ("ab" * 32), "node-1.0-1.squashfs")[:8]
'abababab'
>>> sidecar_digest("%s  other.squashfs\\n" % ("ab" * 32), "node-1.0-1.squashfs") is None
True
>>> liveimg_url("http://h/nodes/", "node-1.0-1.squashfs")
'http://h/nodes/node-1.0-1.squashfs'
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from ..compose.kickstart import (
    BUILD_TEMPLATE,
    DEFAULT_TEMPLATE,
    ROOT_SIZE_MIB,
    Template,
    check_url,
    find_template,
    render_build,
    render_template,
    syntax_versions,
    templates,
    validate,
)
from ..errors import die
from .site import KICKSTART_COMMENT, Site

#: the node's volume group and thin pool in the explicit layout (as imgbase install makes)
VG, POOL = "imgbase", "pool"


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
    from ..image.squashfs import sha256_file

    digest = sha256_file(str(image))
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
    from ..node.install import VOLUME_PROFILES

    rows = VOLUME_PROFILES["nist" if nist else "minimal"]
    return tuple(Volume(mount, lv, int(size.removesuffix("G")) * 1024)
                 for mount, lv, size in rows)


def render_install(template: Template, *, image: Path | None, url: str | None,
                   site: Site, nist: bool = False) -> str:
    """A node install kickstart from an install template, validated."""
    from .. import __version__
    from ..compose.postprocess import IMAGE_JSON
    from ..storage.layout import MOUNT_TAG
    from ..storage.lvm import TAG_VOLUME

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
        "agent_toml": site.cluster.agent_toml(KICKSTART_COMMENT) if site.cluster else None,
        "vg": VG, "pool": POOL, "root_size": ROOT_SIZE_MIB, "volumes": volumes,
        "tagged_volumes": [v for v in volumes if v.mount != "/var"],
        "tag_volume": TAG_VOLUME, "mount_tag": MOUNT_TAG, "image_json_path": "/" + IMAGE_JSON,
    }
    text = render_template(template, context)
    validate(text, str(template.path))
    check_liveimg(text, source, checksum, str(template.path))
    return text


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
        from ..image.spec import load_image

        return render_build(template, load_image(Path(image_spec)), tuple(repos or ()))
    if image_spec or repos:
        die(f"--image-spec and --repo go with build templates, not {template.name}",
            hint=f"imgbase kickstart render {BUILD_TEMPLATE} --image-spec IMAGE.toml")
    site = load_site(Path(site_file)) if site_file else Site()
    site = site.override(endpoints=endpoints, group=group, kernel_args=kernel_args,
                         ssh_keys=ssh_keys)
    return render_install(template, image=Path(image) if image else None, url=url, site=site,
                          nist=nist)
