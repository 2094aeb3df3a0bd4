"""The dnf backend for real: a local rpm repository built here, composed through the CLI.

rpmbuild makes four tiny noarch packages from spec files written below, createrepo_c
makes a repository of them, and ``imgbase compose --backend dnf`` installs two layers
from it into a non-bootable image. A few seconds: not marked slow.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import imgbase_cli
from tests.httpserve import serve

HEADER = """\
Name: {name}
Version: {version}
Release: {release}
Summary: imgbase test package {name}
License: MIT
BuildArch: noarch
{tags}
%description
A package of the imgbase dnf backend test.

%install
{install}

%files
{files}
"""

PACKAGES = {
    # requires lib (pulled in as a dependency), recommends extra (a weak dependency: skipped)
    "imgbase-test-base": dict(
        version="1.0", release="1",
        tags="Requires: imgbase-test-lib >= 1:2.0\nRecommends: imgbase-test-extra\n",
        install="mkdir -p %{buildroot}/usr/share/imgbase-test\n"
                "echo base > %{buildroot}/usr/share/imgbase-test/base.txt",
        files="/usr/share/imgbase-test/base.txt\n\n"
              # a Lua scriptlet: rpm's own interpreter, no shell needed in the tree
              "%post -p <lua>\n"
              'local f = io.open("/usr/share/imgbase-test/post-ran", "w")\n'
              'f:write("%{name}-%{version}-%{release} %post ran\\n")\n'
              "f:close()\n"),
    "imgbase-test-lib": dict(
        version="2.3", release="4", tags="Epoch: 1\n",
        install="mkdir -p %{buildroot}/etc\n"
                "echo 'setting = 1' > %{buildroot}/etc/imgbase-test.conf",
        files="%config(noreplace) /etc/imgbase-test.conf"),
    "imgbase-test-extra": dict(
        version="0.1", release="1", tags="",
        install="mkdir -p %{buildroot}/usr/share/imgbase-test\n"
                "echo extra > %{buildroot}/usr/share/imgbase-test/extra.txt",
        files="/usr/share/imgbase-test/extra.txt"),
    "imgbase-test-tool": dict(
        version="3.0", release="1.fc40", tags="AutoReq: no\n",  # no /bin/sh in the repo
        install="mkdir -p %{buildroot}/usr/bin\n"
                "printf '#!/bin/sh\\necho tool\\n' > %{buildroot}/usr/bin/imgbase-test-tool\n"
                "chmod 755 %{buildroot}/usr/bin/imgbase-test-tool",
        files="/usr/bin/imgbase-test-tool"),
}

EXPECTED = [  # exactly what the rpmdb must list: the requested packages and the dependency
    {"name": "imgbase-test-base", "version": "1.0-1", "architecture": "noarch"},
    {"name": "imgbase-test-lib", "version": "1:2.3-4", "architecture": "noarch"},
    {"name": "imgbase-test-tool", "version": "3.0-1.fc40", "architecture": "noarch"},
]


def sh(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{argv[0]} failed: {proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    missing = [t for t in ("dnf", "rpm", "rpmbuild", "createrepo_c", "unsquashfs")
               if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install dnf createrepo-c rpm "
                    "squashfs-tools (make setup)")


@pytest.fixture(scope="module")
def rpms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four packages built with rpmbuild; returns the directory of .rpm files."""
    top = tmp_path_factory.mktemp("rpmbuild")
    (top / "SPECS").mkdir()
    for name, fields in PACKAGES.items():
        spec = top / "SPECS" / f"{name}.spec"
        spec.write_text(HEADER.format(name=name, **fields))
        sh("rpmbuild", "-bb", "--define", f"_topdir {top}", spec)
    return top / "RPMS" / "noarch"


def make_repo(rpms: Path, repo: Path) -> Path:
    shutil.copytree(rpms, repo)
    sh("createrepo_c", "-q", repo)
    return repo


@pytest.fixture(scope="module")
def repo(rpms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(rpms, tmp_path_factory.mktemp("repo") / "repo")


@pytest.fixture(scope="module")
def http_repo(repo: Path) -> Iterator[str]:
    """The repository served over http on 127.0.0.1, so dnf downloads (and caches) rpms."""
    with serve(repo) as port:
        yield f"http://127.0.0.1:{port}/"


@dataclass
class Project:
    image: Path
    out: Path
    cache: Path

    def compose(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return imgbase_cli("compose", str(self.image), "-o", str(self.out), "--cache",
                           str(self.cache), "--json", *extra)


def write_project(tmp: Path, repo: Path | str, *, site_packages: str = '"imgbase-test-tool"',
                  image_extra: str = 'unsigned = true\nbootable = false\n') -> Project:
    """An image (backend left at its default) with two layers in tmp."""
    layers = tmp / "layers"
    (layers / "site/files/etc").mkdir(parents=True)
    (layers / "base.toml").write_text(
        '[layer]\nname = "base"\npackages = ["imgbase-test-base"]\n')
    (layers / "site.toml").write_text(
        f'[layer]\nname = "site"\npackages = [{site_packages}]\n')
    (layers / "site/files/etc/imgbase-site.conf").write_text("site = yes\n")
    image = tmp / "rpmtest.toml"
    url = repo if isinstance(repo, str) else f"file://{repo}"
    image.write_text(f"""\
[image]
name = "rpmtest"
version = "1.0"
release = "1"
distro = "fedora"
suite = "40"
architecture = "{platform.machine()}"
repos = ["{url}"]
{image_extra}layers = ["base", "site"]
layer_dir = "layers"
source_date_epoch = 1767225600
compression_level = 1
""")
    return Project(image, tmp / "out", tmp / "cache")


Composed = tuple[Project, list[dict[str, object]], Path]


def events(proc: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("imgbase: error: ") and "(hint: " in lines[0], lines[0]
    return lines[0]


def nothing_published(project: Project) -> None:
    """At most the build log in the output; no cache entry, no work directory left."""
    left = sorted(p.name for p in project.out.iterdir()) if project.out.exists() else []
    assert left in ([], ["rpmtest-1.0-1.compose.log"]), left
    assert not list((project.cache / "images").glob("*"))
    assert not list((project.cache / "work").glob("*"))


# -- a real compose ---------------------------------------------------------------

@pytest.fixture(scope="module")
def composed(http_repo: str, tmp_path_factory: pytest.TempPathFactory
             ) -> Composed:
    project = write_project(tmp_path_factory.mktemp("project"), http_repo)
    proc = project.compose("--backend", "dnf")
    if proc.returncode != 0:
        pytest.fail(f"compose failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout[-3000:]}")
    tree = tmp_path_factory.mktemp("unsquashed") / "tree"
    sh("unsquashfs", "-q", "-n", "-d", tree, project.out / "rpmtest-1.0-1.squashfs")
    return project, events(proc), tree


def test_the_image_has_the_packages_files(composed: Composed) -> None:
    _, _, tree = composed
    assert (tree / "usr/share/imgbase-test/base.txt").read_text() == "base\n"
    assert (tree / "etc/imgbase-test.conf").read_text() == "setting = 1\n"
    assert os.access(tree / "usr/bin/imgbase-test-tool", os.X_OK)
    assert (tree / "etc/imgbase-site.conf").read_text() == "site = yes\n"  # the layer's files/
    assert (tree / "usr/share/factory/etc/imgbase-test.conf").is_file()


def test_post_scriptlet_ran(composed: Composed) -> None:
    _, _, tree = composed
    assert (tree / "usr/share/imgbase-test/post-ran").read_text() == \
        "imgbase-test-base-1.0-1 %post ran\n"


def test_dependency_pulled_in_weak_dependency_not(composed: Composed) -> None:
    _, _, tree = composed
    assert (tree / "etc/imgbase-test.conf").exists()  # imgbase-test-lib: Requires
    assert not (tree / "usr/share/imgbase-test/extra.txt").exists()  # Recommends, skipped


def test_manifest_lists_exactly_the_rpmdb(composed: Composed) -> None:
    project, _, tree = composed
    manifest = json.loads((project.out / "rpmtest-1.0-1.manifest.json").read_text())
    assert manifest["backend"] == "dnf"  # --backend overrode the image's default
    assert manifest["packages"] == EXPECTED
    assert manifest["kernels"] == []
    # the rpmdb in the image itself says the same
    listed = sh("rpm", f"--root={tree}", "--dbpath=/usr/lib/sysimage/rpm", "-qa",
                "--qf=%{NAME} %{EPOCH} %{VERSION}-%{RELEASE}\n")
    assert sorted(listed.splitlines()) == [
        "imgbase-test-base (none) 1.0-1", "imgbase-test-lib 1 2.3-4",
        "imgbase-test-tool (none) 3.0-1.fc40"]
    sha = (project.out / "rpmtest-1.0-1.sha256").read_text().split()[0]
    assert manifest["squashfs"]["sha256"] == sha


def test_package_state_is_in_usr(composed: Composed) -> None:
    project, _, tree = composed
    listing = sh("unsquashfs", "-l", project.out / "rpmtest-1.0-1.squashfs").splitlines()
    db = [line.removeprefix("squashfs-root/") for line in listing
          if line.startswith("squashfs-root/usr/lib/sysimage/rpm/")]
    assert sorted(db) == ["usr/lib/sysimage/rpm/.rpm.lock", "usr/lib/sysimage/rpm/rpmdb.sqlite"]
    assert not (tree / "root/.rpmdb").exists()  # Debian rpm's own default %_dbpath
    # dnf's own history and logs of the build (host paths, times) are not image state
    assert not (tree / "var/lib/dnf").exists() and not (tree / "usr/lib/sysimage/dnf").exists()
    assert not (tree / "var/log").exists() and not (tree / "etc/dnf").exists()
    assert not (tree / "var/cache").exists()  # the cache's mount point went again


def test_steps_and_cache(composed: Composed) -> None:
    project, evs, _ = composed
    done = {e["step"]: e for e in evs if e["event"] == "step-done"}
    assert done["boot-check"]["detail"] == "skipped: bootable = false"
    assert "imgbase-deb" not in done
    cached = sorted(p.name for p in (project.cache / "dnf").glob("imgbase-0-*/packages/*.rpm"))
    assert cached == ["imgbase-test-base-1.0-1.noarch.rpm", "imgbase-test-lib-2.3-4.noarch.rpm",
                      "imgbase-test-tool-3.0-1.fc40.noarch.rpm"]  # keepcache: for the next one
    start = next(e for e in evs if e["event"] == "compose-start")
    assert start["backend"] == "dnf"


def test_a_second_compose_is_byte_identical(composed: Composed,
                                            tmp_path: Path) -> None:
    project, _, _ = composed
    again = Project(project.image, tmp_path / "out", project.cache)
    proc = again.compose("--backend", "dnf", "--rebuild")
    assert proc.returncode == 0, proc.stderr
    first, second = ((p.out / "rpmtest-1.0-1.sha256").read_text() for p in (project, again))
    if first != second:
        diff = imgbase_cli("diff", str(project.out / "rpmtest-1.0-1.squashfs"),
                           str(again.out / "rpmtest-1.0-1.squashfs"))
        pytest.fail(f"images differ; files:\n{diff.stdout}{diff.stderr}")


# -- signed repositories ----------------------------------------------------------

@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    env = {"GNUPGHOME": str(home)}
    sh("gpg", "--batch", "--passphrase", "", "--quick-gen-key", "imgbase test <test@invalid>",
       "ed25519", "sign", "never", env=env)
    key = home / "key.asc"
    key.write_text(sh("gpg", "--armor", "--export", "test@invalid", env=env))
    return env, key


def test_signed_repository(rpms: Path, signing_key: tuple[dict[str, str], Path],
                           tmp_path: Path) -> None:
    env, key = signing_key
    signed = tmp_path / "signed"
    shutil.copytree(rpms, signed)
    sh("rpmsign", "--define", "_gpg_name test@invalid", "--define", "__gpg /usr/bin/gpg",
       "--addsign", *sorted(signed.glob("*.rpm")), env=env)
    sh("createrepo_c", "-q", signed)
    project = write_project(tmp_path, signed, image_extra=f'gpgkeys = ["file://{key}"]\n'
                            'bootable = false\nbackend = "dnf"\n')
    proc = project.compose()
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((project.out / "rpmtest-1.0-1.manifest.json").read_text())
    assert manifest["packages"] == EXPECTED  # the imported key (gpg-pubkey) is no package


def test_unsigned_packages_with_gpgkeys_are_refused(
        repo: Path, signing_key: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    _, key = signing_key
    project = write_project(tmp_path, repo, image_extra=f'gpgkeys = ["file://{key}"]\n'
                            'bootable = false\nbackend = "dnf"\n')
    line = one_line_error(project.compose(), 1)
    assert "dnf failed" in line and "not signed by any of the gpgkeys" in line
    nothing_published(project)


# -- bad input ----------------------------------------------------------------------

def test_unknown_package_names_package_and_layer(repo: Path, tmp_path: Path) -> None:
    project = write_project(tmp_path, repo,
                            site_packages='"imgbase-test-tool", "imgbase-test-nosuch"')
    line = one_line_error(project.compose("--backend", "dnf"), 1)
    assert "unknown package 'imgbase-test-nosuch' in layer 'site'" in line
    nothing_published(project)


@pytest.mark.parametrize(("extra", "phrase"), [
    ("bootable = false\n", "give gpgkeys = [...]"),
    ("unsigned = true\n", "non-bootable images only: set bootable = false"),
    ('unsigned = true\nbootable = false\narchitecture = "s390x"\n', "not s390x"),
])
def test_images_dnf_cannot_compose(repo: Path, tmp_path: Path, extra: str, phrase: str) -> None:
    project = write_project(tmp_path, repo, image_extra=extra)
    if "architecture" in extra:
        text = project.image.read_text()
        project.image.write_text(text.replace(f'architecture = "{platform.machine()}"\n', ""))
    line = one_line_error(project.compose("--backend", "dnf"), 2)
    assert phrase in line
    assert not project.out.exists() and not project.cache.exists()


def test_repos_without_an_rpm_backend(tmp_path: Path, repo: Path) -> None:
    project = write_project(tmp_path, repo)  # the image's backend: the default, mmdebstrap
    line = one_line_error(project.compose(), 2)
    assert "the mmdebstrap backend does not use repos" in line and "--backend dnf" in line


def test_dnf_needs_repos(tmp_path: Path, repo: Path) -> None:
    project = write_project(tmp_path, repo)
    text = project.image.read_text().replace(f'repos = ["file://{repo}"]\n', "")
    project.image.write_text(text.replace("unsigned = true\n", ""))
    line = one_line_error(project.compose("--backend", "dnf"), 2)
    assert "the dnf backend needs repos = [...]" in line


@pytest.mark.parametrize(("extra", "phrase"), [
    ('unsigned = true\ngpgkeys = ["file:///k.asc"]\n', "contradict"),
    ('gpgkeys = ["k.asc"]\n', "is not a valid URL"),
])
def test_repo_keys_are_validated(tmp_path: Path, repo: Path, extra: str, phrase: str) -> None:
    project = write_project(tmp_path, repo, image_extra=extra)
    line = one_line_error(project.compose(), 2)
    assert "rpmtest.toml:" in line and phrase in line


def test_list_backends(tmp_path: Path) -> None:
    proc = imgbase_cli("compose", "--list-backends", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)["backends"]}
    assert list(rows)[:2] == ["mmdebstrap", "dnf"]
    assert rows["dnf"]["runs_here"] is True and rows["dnf"]["reason"] is None
    # without dnf on PATH: says so, and which apt package brings it
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(shutil.which("rpm"), bindir / "rpm")  # type: ignore[arg-type]
    proc = imgbase_cli("compose", "--list-backends", env={"PATH": str(bindir)})
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("dnf "))
    assert line.split()[1:] == ["unavailable", "missing", "dnf", "(apt-get", "install", "dnf)"]
