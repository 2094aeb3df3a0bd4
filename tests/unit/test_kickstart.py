"""Kickstarts: every template and option combination renders, passes pykickstart for every
syntax version and says what it should; bad input is refused with one line and exit 2, and
nothing is written."""

from __future__ import annotations

import base64
import hashlib
import inspect
import itertools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pykickstart import constants
from pykickstart.parser import KickstartParser
from pykickstart.version import makeVersion

from imgbase.compose import kickstart as build_kickstart
from imgbase.errors import InputError
from imgbase.image.spec import ImageSpec, load_image
from imgbase.kickstart import render as kickstart
from imgbase.node import agentconfig as agent_config
from tests.conftest import ROOT, imgbase_cli

VERSIONS = build_kickstart.syntax_versions()
NVR = "tiny-node-1.0-1"
URL = f"http://images.example.org/nodes/{NVR}.squashfs"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx2dGVzdGtleWZvcmtpY2tzdGFydHM admin@example.org"
SITE = f"""\
image_url = "http://images.example.org/nodes/"
disk = "vda"
timezone = "Europe/Berlin"
kernel_args = ["console=ttyS0,115200", "mitigations=auto"]
ssh_keys = ["{KEY}"]

[cluster]
endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
group = "rack1"
ca = "/etc/imgbase/agent/ca.pem"
cert = "/etc/imgbase/agent/node.pem"
key = "/etc/imgbase/agent/node-key.pem"
"""


def assert_refused(proc: subprocess.CompletedProcess[str], *phrases: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("imgbase: error: ") and "(hint: " in lines[0], lines[0]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert proc.stdout == ""
    return lines[0]


def parse(text: str, version: str) -> Any:
    handler = makeVersion(version)
    KickstartParser(handler, errorsAreFatal=True, followIncludes=False
                    ).readKickstartFromString(text)
    return handler


def post_script(handler: Any) -> str:
    posts = [s for s in handler.scripts if s.type == constants.KS_SCRIPT_POST]
    assert len(posts) == 1
    assert posts[0].errorOnFail and posts[0].inChroot
    script: str = posts[0].script
    sh = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True)
    assert sh.returncode == 0, sh.stderr  # the shell can parse it
    return script


def heredoc(script: str, tag: str) -> str:
    m = re.search(rf"<<'{tag}'\n(.*?)^{tag}$", script, re.S | re.M)
    assert m, f"no here-document {tag}"
    return m[1]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny squashfs 'image' with an image.json, and its .sha256 as compose writes it."""
    d = tmp_path_factory.mktemp("image")
    tree = d / "tree"
    (tree / "usr/lib/imgbase").mkdir(parents=True)
    (tree / "usr/lib/imgbase/image.json").write_text(f'{{"nvr": "{NVR}"}}\n')
    img = d / f"{NVR}.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(img), "-quiet", "-noappend", "-all-root",
                    "-no-progress"], check=True, capture_output=True)
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    (d / f"{NVR}.sha256").write_text(f"{digest}  {img.name}\n")
    return img


@pytest.fixture(scope="module")
def site_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("site") / "site.toml"
    path.write_text(SITE)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- install templates: every combination, every syntax version ------------------------

COMBINATIONS = [
    (name, nist, site, flags)
    for name, nist in (("node-thinp", False), ("node-explicit", False), ("node-explicit", True))
    for site, flags in itertools.product((False, True), (False, True))
]


@pytest.mark.parametrize(("name", "nist", "with_site", "with_flags"), COMBINATIONS,
                         ids=[f"{n}-{'nist' if x else 'min'}-{'site' if s else 'nosite'}-"
                              f"{'flags' if f else 'noflags'}" for n, x, s, f in COMBINATIONS])
def test_install_combinations(image: Path, site_file: Path, name: str, nist: bool,
                              with_site: bool, with_flags: bool) -> None:
    flags: dict[str, Any] = {}
    if with_flags:  # replace the site file's values
        flags = {"endpoints": ["https://etcd.example.org:2379"], "group": "rack9",
                 "kernel_args": ["quiet"], "ssh_keys": [KEY.replace("admin", "ops")]}
    text = kickstart.render_command(
        name, image=str(image), url=None if with_site else URL, nist=nist,
        site_file=str(site_file) if with_site else None, **flags)
    assert f"kickstarts/{name}.ks.j2" in text.splitlines()[0]
    for version in VERSIONS:
        h = parse(text, version)
        # the image: the URL and the sha256 of the very file
        assert h.liveimg.url == URL
        assert h.liveimg.checksum == sha256(image)
        assert h.bootloader.location == "none"  # imgbase owns the boot menu
        assert h.rootpw.lock and h.zerombr.zerombr
        if with_site:
            assert h.ignoredisk.onlyuse == ["vda"] and h.clearpart.drives == ["vda"]
            assert h.timezone.timezone == "Europe/Berlin"
        else:
            assert h.ignoredisk.onlyuse == [] and h.clearpart.drives == []
        if name == "node-thinp":
            assert h.autopart.autopart and h.autopart.type == constants.AUTOPART_TYPE_LVM_THINP
            assert h.autopart.fstype == "ext4" and h.autopart.nohome and h.autopart.noswap
            assert not h.logvol.lvList
        else:
            check_explicit_layout(h, nist)
        script = post_script(h)
        check_post(script, name, nist, with_site, with_flags)


def check_explicit_layout(h: Any, nist: bool) -> None:
    assert not h.autopart.autopart and h.reqpart.reqpart
    boot = next(p for p in h.partition.partitions if p.mountpoint == "/boot")
    assert boot.size >= 1024 and boot.fstype == "ext4"
    pv = next(p for p in h.partition.partitions if p.mountpoint.startswith("pv."))
    assert [(v.vgname, v.physvols) for v in h.volgroup.vgList] == [("imgbase", [pv.mountpoint])]
    pools = [lv for lv in h.logvol.lvList if lv.thin_pool]
    assert [(p.vgname, p.name, p.percent) for p in pools] == [("imgbase", "pool", 90)]
    thin = {lv.mountpoint: lv for lv in h.logvol.lvList if lv.thin_volume}
    want = {"/", "/var"} | ({"/var/log", "/var/log/audit", "/var/crash", "/var/tmp", "/home",
                            "/tmp"} if nist else set())
    assert set(thin) == want
    for lv in thin.values():
        assert lv.pool_name == "pool" and lv.vgname == "imgbase" and lv.fstype == "ext4"
        assert "discard" in lv.fsopts.split(","), lv.mountpoint
    assert thin["/"].name == "root" and thin["/var"].name == "var"


def check_post(script: str, name: str, nist: bool, with_site: bool, with_flags: bool) -> None:
    lines = script.splitlines()
    assert "set -eu" in lines
    [layout] = [line for line in lines if line.startswith("imgbase layout --init")]
    grub = next(i for i, line in enumerate(lines) if line.startswith("grub-install"))
    init = lines.index(layout)
    assert grub < init
    # the agent's join config: written before layout --init (it goes into base and layer),
    # and what the agent itself accepts
    if with_site or with_flags:
        toml = heredoc(script, "IMGBASE_AGENT_TOML")
        assert script.index("/etc/imgbase/agent.toml") < script.index("imgbase layout --init")
        cfg = agent_config.parse(toml, Path("agent.toml"))
        if with_flags:
            assert cfg.endpoints == ("https://etcd.example.org:2379",) and cfg.group == "rack9"
        else:
            assert cfg.endpoints == ("https://10.0.0.1:2379", "https://10.0.0.2:2379")
            assert cfg.group == "rack1"
        if with_site:  # TLS material by reference, never the files
            assert (cfg.ca, cfg.cert, cfg.key) == ("/etc/imgbase/agent/ca.pem",
                                                   "/etc/imgbase/agent/node.pem",
                                                   "/etc/imgbase/agent/node-key.pem")
        keys = heredoc(script, "IMGBASE_SSH_KEYS").splitlines()
        assert keys == [KEY.replace("admin", "ops") if with_flags else KEY]
        # the first layer's entry is written with them (no VG to guess afterwards)
        want = ["quiet"] if with_flags else ["console=ttyS0,115200", "mitigations=auto"]
        assert re.findall(r"--karg (\S+)", layout) == want
    else:
        assert "agent.toml" not in script and "authorized_keys" not in script
        assert layout == "imgbase layout --init"
    tags = [line for line in lines if line.startswith("lvchange --addtag imgbase:volume")]
    if nist:
        assert len(tags) == 6 and all(lines.index(t) > init for t in tags)
        assert "lvchange --addtag imgbase:volume --addtag imgbase:mount=/var/log/audit " \
               "imgbase/var_log_audit" in tags
    else:
        assert tags == []


def test_thinp_has_no_nist(image: Path) -> None:
    with pytest.raises(InputError, match="no NIST layout"):
        kickstart.render_command("node-thinp", image=str(image), url=URL, nist=True)


def test_default_template(image: Path) -> None:
    text = kickstart.render_command(None, image=str(image), url=URL)
    assert "kickstarts/node-thinp.ks.j2" in text
    for version in VERSIONS:
        h = parse(text, version)
        assert h.liveimg.url == URL and h.liveimg.checksum == sha256(image)


def test_checksum_is_of_the_image_and_a_sidecar_must_agree(image: Path, tmp_path: Path) -> None:
    # compose's <nvr>.sha256 (the fixture) agrees
    assert kickstart.image_checksum(image) == sha256(image)
    img = tmp_path / image.name
    shutil.copy(image, img)
    # a sidecar that names another file says nothing about the image
    (tmp_path / f"{img.name}.sha256").write_text(f"{'ab' * 32}  other.squashfs\n")
    assert kickstart.image_checksum(img) == sha256(image)
    # one that names the image with another digest is stale or forged: refused, never used
    (tmp_path / f"{img.name}.sha256").write_text(f"{'ab' * 32}  {img.name}\n")
    with pytest.raises(InputError, match=r"gives tiny-node-1.0-1.squashfs the sha256 "
                       r"abababababab\.\.\., but the image's is"):
        kickstart.image_checksum(img)


@pytest.mark.parametrize("url", [
    f"{URL}#",  # shlex.split(comments=True): the rest of the line, --checksum too, is gone
    f"{URL}?x=#y",
    f"http://images.example.org/nodes/{NVR}.squashfs\t",
    f"http://images.example.org/a b/{NVR}.squashfs",
    f"http://images.example.org/a'b/{NVR}.squashfs",
    f'http://images.example.org/a"b/{NVR}.squashfs',
    f"http://images.example.org/a\\b/{NVR}.squashfs",
    f"http://images.example.org/a%2/{NVR}.squashfs",
    f"http://images.example.org/\u00e9/{NVR}.squashfs",
    f"http://[::1/{NVR}.squashfs",
], ids=["fragment", "query-fragment", "tab", "space", "quote", "double-quote", "backslash",
        "bad-escape", "non-ascii", "bad-host"])
def test_urls_anaconda_would_read_otherwise_are_refused(image: Path, tmp_path: Path,
                                                        url: str) -> None:
    out = tmp_path / "node.ks"
    proc = imgbase_cli("kickstart", "render", "--image", str(image), "--url", url,
                       "-o", str(out))
    assert_refused(proc, "--url", "is not a URL anaconda can fetch", "#fragment")
    assert not out.exists()
    site = tmp_path / "site.toml"
    site.write_text(f"image_url = {json.dumps(url)}\n")
    proc = imgbase_cli("kickstart", "render", "--image", str(image), "--site", str(site),
                       "-o", str(out))
    assert_refused(proc, "image_url", "is not a URL anaconda can fetch")
    assert not out.exists()


@pytest.mark.parametrize("url", [
    URL, f"https://images.example.org:8443/n%20odes/{NVR}.squashfs",
    f"http://images.example.org/nodes/{NVR}.squashfs?token=a-b_c~d&x=1;y=$z",
    f"http://[fd00::1]:8080/nodes/{NVR}.squashfs", f"file:///srv/images/{NVR}.squashfs",
], ids=["plain", "port-escape", "query", "ipv6", "file"])
def test_the_rendered_liveimg_parses_back_to_the_url_and_checksum(image: Path,
                                                                  url: str) -> None:
    text = kickstart.render_command("node-explicit", image=str(image), url=url)
    lines = [line for line in text.splitlines() if line.startswith("liveimg ")]
    assert lines == [f"liveimg --url={url} --checksum={sha256(image)}"]
    for version in VERSIONS:
        h = parse(text, version)
        assert (h.liveimg.url, h.liveimg.checksum) == (url, sha256(image))


@pytest.mark.parametrize("line", [
    "liveimg --url={{ url }}",
    "liveimg --url={{ url }}#{{ checksum }}",
    "liveimg --url=http://elsewhere.example.org/{{ image_name }} --checksum={{ checksum }}",
], ids=["no-checksum", "commented-out", "other-url"])
def test_a_template_that_loses_the_checksum_or_url_is_refused(image: Path, tmp_path: Path,
                                                              line: str) -> None:
    template = tmp_path / "custom.ks.j2"
    head = (ROOT / "kickstarts/_node-head.ks.j2").read_text()
    template.write_text((ROOT / "kickstarts/node-thinp.ks.j2").read_text().replace(
        '{% include "_node-head.ks.j2" %}',
        head.replace("liveimg --url={{ url }} --checksum={{ checksum }}", line)))
    out = tmp_path / "node.ks"
    proc = imgbase_cli("kickstart", "render", str(template), "--image", str(image),
                       "--url", URL, "-o", str(out))
    assert_refused(proc, "the rendered kickstart's liveimg is", "--checksum={{ checksum }}")
    assert not out.exists()


def test_templates_listed() -> None:
    names = {t.name: t for t in build_kickstart.templates()}
    assert {"node-thinp", "node-explicit", "build-pxe-live"} <= set(names)
    assert names["node-explicit"].options == ("nist",)
    assert names["build-pxe-live"].kind == "build"
    proc = imgbase_cli("kickstart", "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(names)
    assert any(line.startswith("node-thinp") and line.endswith("(default)") for line in lines)
    assert all(len(line.split()) > 3 for line in lines)  # name, kind, a description


def test_syntax_versions() -> None:
    assert VERSIONS[0] == "F39" and "RHEL9" in VERSIONS
    assert len(VERSIONS) >= 3


# -- the CLI: writes only what passed; bad input refused ------------------------------

def test_cli_writes_output(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "node.ks"
    proc = imgbase_cli("kickstart", "render", "node-explicit", "--nist", "--image", str(image),
                       "--url", URL, "--endpoint", "https://e1:2379", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    text = out.read_text()
    assert f"--checksum={sha256(image)}" in text
    assert [p.name for p in tmp_path.iterdir()] == ["node.ks"]  # no temporary file left


BAD_TEMPLATE = """\
{#- kind: install | description: a template with a command anaconda does not know -#}
{% include "_node-head.ks.j2" %}
autopart --type=thinp --fstype=ext4
bogus-command --now
{% include "_node-post.ks.j2" %}
"""

# Fedora still takes btrfs; RHEL refuses it
FEDORA_ONLY_TEMPLATE = """\
{#- kind: install | description: btrfs, which RHEL refuses -#}
{% include "_node-head.ks.j2" %}
part btrfs.01 --size=8192
btrfs / --data=single btrfs.01
{% include "_node-post.ks.j2" %}
"""


@pytest.mark.parametrize(("body", "phrases"), [
    (BAD_TEMPLATE, ("pykickstart (F39 syntax)", "Unknown command: bogus-command",
                    "occurred on line")),
    (FEDORA_ONLY_TEMPLATE, ("pykickstart (RHEL9 syntax)", "Btrfs")),
], ids=["unknown-command", "fedora-only"])
def test_pykickstart_refusal_writes_nothing(image: Path, tmp_path: Path, body: str,
                                            phrases: tuple[str, ...]) -> None:
    template = tmp_path / "custom.ks.j2"
    template.write_text(body)
    out = tmp_path / "node.ks"
    out.write_text("the kickstart from before\n")
    proc = imgbase_cli("kickstart", "render", str(template), "--image", str(image),
                       "--url", URL, "-o", str(out))
    assert_refused(proc, str(template), *phrases)
    assert out.read_text() == "the kickstart from before\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.ks.j2", "node.ks"]


def test_custom_template_that_passes(image: Path, tmp_path: Path) -> None:
    """A site's own template (here: the default one with a different root size)."""
    template = tmp_path / "site-node.ks.j2"
    template.write_text((ROOT / "kickstarts/node-thinp.ks.j2").read_text()
                        .replace("--noswap", "--noswap --nohome"))
    proc = imgbase_cli("kickstart", "render", str(template), "--image", str(image),
                       "--url", URL)
    assert proc.returncode == 0, proc.stderr
    assert "kickstarts/site-node.ks.j2" in proc.stdout.splitlines()[0]


def test_liveimg_without_checksum_refused(tmp_path: Path) -> None:
    out = tmp_path / "node.ks"
    proc = imgbase_cli("kickstart", "render", "--url", URL, "-o", str(out))
    assert_refused(proc, "without a checksum", "--image")
    assert not out.exists()
    proc = imgbase_cli("kickstart", "render", "--url", URL, "--no-checksum", "-o", str(out))
    assert proc.returncode == 2 and "unrecognized arguments: --no-checksum" in proc.stderr
    assert not out.exists()


def test_missing_image(tmp_path: Path) -> None:
    out = tmp_path / "node.ks"
    proc = imgbase_cli("kickstart", "render", "--image", str(tmp_path / "nope.squashfs"),
                       "--url", URL, "-o", str(out))
    assert_refused(proc, "nope.squashfs: no such image")
    assert not out.exists()


@pytest.mark.parametrize(("text", "phrases"), [
    ('image_url = "http://h/"\nimgae_url = "x"\n', ("unknown key 'imgae_url'",)),
    ('[cluster]\nendpoints = ["https://e:2379"]\ngropu = "a"\n',
     ("site.toml:3: unknown key 'gropu' in [cluster]",)),
    ('[cluster]\nendpoints = ["etcd:2379"]\n', ("is not an http(s) URL",)),
    ('[cluster]\nendpoints = ["https://e:2379"]\nca = "ca.pem"\n',
     ("cluster.ca", "not an absolute path")),
    ('kernel_args = ["a b"]\n', ("kernel_args", "cannot go into a boot entry")),
    ('kernel_args = ["root=/dev/sda1"]\n', ("root= is set by imgbase",)),
    ('ssh_keys = ["not a key"]\n', ("is not an SSH public key",)),
    ('timezone = "UTC --isUtc"\n', ("cannot stand on a kickstart line",)),
    ('image_url = "http://h/x y/"\n', ("image_url", "is not a URL anaconda can fetch")),
    ("image_url = \n", ("TOML syntax error",)),
], ids=["unknown-key", "unknown-cluster-key", "bad-endpoint", "relative-tls-path",
        "karg-space", "karg-root", "ssh-key", "timezone-injection", "url-space", "toml"])
def test_bad_site_file(image: Path, tmp_path: Path, text: str,
                       phrases: tuple[str, ...]) -> None:
    site = tmp_path / "site.toml"
    site.write_text(text)
    out = tmp_path / "node.ks"
    proc = imgbase_cli("kickstart", "render", "--image", str(image), "--url", URL,
                       "--site", str(site), "-o", str(out))
    assert_refused(proc, *phrases)
    if "TOML" not in phrases[0] and "cluster" not in text:
        assert str(site) in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(("args", "phrases"), [
    (("node-thinp", "--nist"), ("no NIST layout",)),
    (("node-thinp", "--url", "http://h/other.squashfs"), ("serves 'other.squashfs'",)),
    (("--karg", "a;b"), ("--karg", "cannot go into a boot entry")),
    (("--ssh-key", "/nonexistent.pub"), ("--ssh-key", "not an SSH public key")),
    (("--group", "rack1"), ("no cluster is given",)),
    (("--endpoint", "ftp://e:2379"), ("is not an http(s) URL",)),
    (("no-such-template",), ("no kickstart template 'no-such-template'",)),
    (("--image-spec", "images/node.toml"), ("go with build templates",)),
], ids=["nist-thinp", "url-mismatch", "karg", "ssh-key", "group-alone", "endpoint",
        "template", "image-spec"])
def test_bad_flags(image: Path, tmp_path: Path, args: tuple[str, ...],
                   phrases: tuple[str, ...]) -> None:
    out = tmp_path / "node.ks"
    url = () if "--url" in args else ("--url", URL)
    proc = imgbase_cli("kickstart", "render", *args, "--image", str(image), *url,
                       "-o", str(out))
    assert_refused(proc, *phrases)
    assert not out.exists()


def test_url_from_site_needs_the_image(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('image_url = "http://images.example.org/nodes/"\n')
    proc = imgbase_cli("kickstart", "render", "--site", str(site))
    assert_refused(proc, "without a checksum", "--image")


# -- the build kickstart ------------------------------------------------------------------

def make_spec(tmp_path: Path, layers: dict[str, str], image_extra: str = "") -> Path:
    (tmp_path / "layers").mkdir(exist_ok=True)
    for name, body in layers.items():
        (tmp_path / "layers" / f"{name}.toml").write_text(f'[layer]\nname = "{name}"\n{body}')
    spec = tmp_path / "images" / "tiny.toml"
    spec.parent.mkdir(exist_ok=True)
    names = ", ".join(f'"{n}"' for n in layers)
    spec.write_text(f'[image]\nname = "tiny-node"\nversion = "2.0"\nrelease = "3"\n'
                    f'layers = [{names}]\nsource_date_epoch = 1767225600\n{image_extra}')
    return spec


@pytest.fixture
def build_spec(tmp_path: Path) -> ImageSpec:
    spec = make_spec(tmp_path, {
        "os": 'packages = ["kernel", "systemd", "lvm2"]\n'
              'kernel_args = ["console=ttyS0,115200", "quiet"]\nhooks = ["hooks/10-say.sh"]\n'
              '[services]\nenable = ["sshd"]\ndisable = ["kdump"]\nmask = ["tmp.mount"]\n',
        "agent": 'packages = ["python3-requests"]\nimgbase_package = true\n',
        "site": "",
    })
    files = tmp_path / "layers/os/files"
    (files / "etc/motd.d").mkdir(parents=True)
    (files / "etc/motd.d/node").write_text("a node, with 'quotes' and $dollars\n")
    (files / "usr/local/bin").mkdir(parents=True)
    (files / "usr/local/bin/tool").write_bytes(b"#!/bin/sh\n\x00binary\n")
    (files / "usr/local/bin/tool").chmod(0o750)
    (files / "etc/localtime").symlink_to("/usr/share/zoneinfo/UTC")
    (tmp_path / "layers/os/hooks").mkdir()
    (tmp_path / "layers/os/hooks/10-say.sh").write_text("#!/bin/sh\necho $IMGBASE_LAYER\n")
    site_files = tmp_path / "layers/site/files/etc"
    site_files.mkdir(parents=True)
    (site_files / "issue").write_text("site\n")
    return load_image(spec)


def test_build_signature() -> None:
    sig = inspect.signature(build_kickstart.render_build_kickstart)
    assert list(sig.parameters) == ["image", "repo_urls"]
    assert sig.parameters["repo_urls"].default == ()
    assert sig.return_annotation in ("str", str)


def test_build_kickstart(build_spec: ImageSpec) -> None:
    repos = ("https://mirror.example.org/fedora/$releasever/$basearch/os/",
             "http://repo.example.org/imgbase/")
    text = build_kickstart.render_build_kickstart(build_spec, repos)
    for version in VERSIONS:
        h = parse(text, version)
        assert h.url.url == repos[0]
        assert [r.baseurl for r in h.repo.repoList] == [repos[1]]
        assert h.bootloader.appendLine == "console=ttyS0,115200 quiet"
        assert sorted(h.packages.packageList) == sorted([
            "kernel", "systemd", "lvm2", "python3-requests", "imgbase", "dracut-live",
            "dracut-network"])
        # what livemedia-creator's check_kickstart demands (pylorax creator.py)
        assert [p.mountpoint for p in h.partition.partitions] == ["/"]
        assert not h.autopart.seen and h.method.method == "url"
        assert h.displaymode.displayMode is None
        assert any(n.activate for n in h.network.network)
        assert h.reboot.action == constants.KS_SHUTDOWN
        script = post_script(h)
    lines = script.splitlines()
    packages = text[text.index("%packages\n"):text.index("%end")].splitlines()[1:]
    assert packages == ["kernel", "systemd", "lvm2", "python3-requests", "imgbase",
                        "dracut-live", "dracut-network"]  # layer order, then what imgbase adds
    # files: contents byte for byte, modes, the link; root-owned by the %post itself
    blocks = re.findall(r"base64 -d > (\S+) <<'IMGBASE_FILE'\n(.*?)^IMGBASE_FILE$", script,
                        re.S | re.M)
    got = {path: base64.b64decode(data) for path, data in blocks}
    assert got["/etc/motd.d/node"] == b"a node, with 'quotes' and $dollars\n"
    assert got["/usr/local/bin/tool"] == b"#!/bin/sh\n\x00binary\n"
    assert got["/tmp/imgbase-hook"] == b"#!/bin/sh\necho $IMGBASE_LAYER\n"
    assert got["/etc/issue"] == b"site\n"
    assert "chmod 0750 /usr/local/bin/tool" in lines
    assert "ln -s /usr/share/zoneinfo/UTC /etc/localtime" in lines
    assert "[ -d /etc/motd.d ] || mkdir -m 0755 /etc/motd.d" in lines
    assert "IMGBASE_LAYER=os IMGBASE_NVR=tiny-node-2.0-3 /tmp/imgbase-hook" in lines
    # compose's order per layer: files, hooks, services; layers in image order
    order = [lines.index(x) for x in ("chmod 0750 /usr/local/bin/tool",
                                      "IMGBASE_LAYER=os IMGBASE_NVR=tiny-node-2.0-3 "
                                      "/tmp/imgbase-hook",
                                      "systemctl enable sshd", "systemctl disable kdump",
                                      "systemctl mask tmp.mount", "chmod 0644 /etc/issue")]
    assert order == sorted(order)
    # imgbase's post-processing inside the image, after every layer
    image_json = json.loads(heredoc(script, "IMGBASE_IMAGE_JSON"))
    assert image_json["nvr"] == "tiny-node-2.0-3"
    assert image_json["layers"] == ["os", "agent", "site"]
    assert image_json["kernel_args"] == ["console=ttyS0,115200", "quiet"]
    factory = next(i for i, line in enumerate(lines) if "factory_etc" in line)
    assert lines[factory].startswith("python3 -c 'from pathlib import Path; from imgbase")
    assert factory > lines.index("chmod 0644 /etc/issue")
    assert ": > /etc/machine-id" in lines and ": > /etc/fstab" in lines


def test_build_repos_default_to_the_image(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, {"agent": 'packages = ["kernel"]\nimgbase_package = true\n'},
                     'repos = ["https://mirror.example.org/os/"]\nunsigned = true\n')
    image = load_image(spec)
    if not getattr(image, "repos", ()):
        pytest.skip("this ImageSpec has no repos")
    text = build_kickstart.render_build_kickstart(image)
    assert parse(text, VERSIONS[-1]).url.url == "https://mirror.example.org/os/"


def test_build_of_the_repository_image() -> None:
    """images/node.toml (layers with files/ trees) renders and validates."""
    image = load_image(ROOT / "images/node.toml")
    text = build_kickstart.render_build_kickstart(image, ("http://deb.example.org/repo/",))
    h = parse(text, "F39")
    assert set(image.packages) <= set(h.packages.packageList)
    assert "base64 -d > /etc/motd <<'IMGBASE_FILE'" in post_script(h)


def test_build_refuses_special_files(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, {"os": 'packages = ["kernel"]\nimgbase_package = true\n'})
    (tmp_path / "layers/os/files/run").mkdir(parents=True)
    os.mkfifo(tmp_path / "layers/os/files/run/pipe")
    with pytest.raises(InputError, match=r"layer 'os': files/ holds .*run/pipe, a special"):
        build_kickstart.render_build_kickstart(load_image(spec), ("http://r/",))


def test_build_refuses_large_files(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, {"os": 'packages = ["kernel"]\nimgbase_package = true\n'})
    (tmp_path / "layers/os/files").mkdir(parents=True)
    (tmp_path / "layers/os/files/blob").write_bytes(b"x" * (build_kickstart.MAX_EMBED + 1))
    with pytest.raises(InputError, match=r"layer 'os': file .*blob is \d+ bytes"):
        build_kickstart.render_build_kickstart(load_image(spec), ("http://r/",))


def test_build_refuses_an_image_without_imgbase(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, {"os": 'packages = ["kernel"]\n'})
    with pytest.raises(InputError, match="no layer installs imgbase"):
        build_kickstart.render_build_kickstart(load_image(spec), ("http://r/",))
    spec = make_spec(tmp_path, {"os": 'packages = ["kernel", "imgbase"]\n'})
    assert "\nimgbase\n" in build_kickstart.render_build_kickstart(load_image(spec), ("http://r/",))


def test_build_cli(tmp_path: Path) -> None:
    out = tmp_path / "build.ks"
    proc = imgbase_cli("kickstart", "render", "build-pxe-live", "--image-spec",
                       str(ROOT / "images/node.toml"), "--repo", "http://r/", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "url --url=http://r/\n" in out.read_text()
    proc = imgbase_cli("kickstart", "render", "build-pxe-live", "--image-spec",
                       str(ROOT / "images/node.toml"), "--url", URL, "-o", str(tmp_path / "x"))
    assert_refused(proc, "--url: for install templates")
    proc = imgbase_cli("kickstart", "render", "build-pxe-live", "--repo", "http://r/")
    assert_refused(proc, "renders from an image spec")
    proc = imgbase_cli("kickstart", "render", "build-pxe-live", "--image-spec",
                       str(ROOT / "images/node.toml"), "--repo", "http://r/x y")
    assert_refused(proc, "repository", "not a URL anaconda can fetch")
    assert not (tmp_path / "x").exists()
