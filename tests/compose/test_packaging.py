"""imgbase as packages: the wheel carries its data (an installed wheel lists kickstart
templates and composes' backends with no checkout), and the .deb a node image carries is
lintian-clean of errors, with man pages, completion and its copyright and changelog."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from imgbase import clidoc
from imgbase.compose import debpkg
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_an_installed_wheel_renders_kickstarts_and_lists_backends(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a clean copy: an in-tree build/ would carry old files
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "out", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("imgbase-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("imgbase/data/layers/base.toml", "imgbase/data/images/node.toml",
                 "imgbase/data/kickstarts/node-thinp.ks.j2", "imgbase/data/boot/lvm",
                 "imgbase/data/man/imgbase.1"):
        assert any(n.startswith(data) for n in names), data
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check",
                    str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"  # no checkout here, nor above
    elsewhere.mkdir()
    listed = subprocess.run([str(venv / "bin/imgbase"), "kickstart", "list"], cwd=elsewhere,
                            capture_output=True, text=True, check=True).stdout
    assert "node-thinp" in listed and "build-pxe-live" in listed
    backends = subprocess.run([str(venv / "bin/imgbase"), "compose", "--list-backends"],
                              cwd=elsewhere, capture_output=True, text=True, check=True).stdout
    assert "mmdebstrap" in backends
    spec = subprocess.run([str(venv / "bin/python"), "-c", "from imgbase.resources import "
                           "DEFAULT_IMAGE; from imgbase.image.spec import load_image; "
                           "print(load_image(DEFAULT_IMAGE).nvr)"], cwd=elsewhere,
                          capture_output=True, text=True, check=True).stdout
    assert spec.startswith("imgbase-node-")  # the default image and its layers load


def test_the_deb_is_lintian_clean_of_errors(tmp_path: Path) -> None:
    deb = debpkg.build_deb(tmp_path, 1700000000)
    lint = subprocess.run(["lintian", "--allow-root", str(deb)], capture_output=True,
                          text=True)
    errors = [line for line in lint.stdout.splitlines() if line.startswith("E:")]
    assert errors == [], lint.stdout
    files = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                           check=True).stdout
    for path in ("usr/share/man/man1/imgbase.1.gz", "usr/share/man/man8/imgbase-agent.8.gz",
                 "usr/share/bash-completion/completions/imgbase",
                 "usr/share/zsh/vendor-completions/_imgbase", "usr/share/doc/imgbase/copyright",
                 "usr/share/doc/imgbase/changelog.gz"):
        assert f"./{path}\n" in files, path
    assert "__pycache__" not in files  # made where it is installed (postinst)
    control = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends", "Recommends"],
                             capture_output=True, text=True, check=True).stdout
    assert "python3-requests" in control.split("Recommends")[0] and "etcd3gw" not in control
    # the same inputs, the same bytes
    (tmp_path / "again").mkdir()
    assert debpkg.build_deb(tmp_path / "again", 1700000000).read_bytes() == deb.read_bytes()


def test_the_completion_knows_the_verbs() -> None:
    bash, zsh = (clidoc.completion("imgbase", shell) for shell in ("bash", "zsh"))
    for verb in ("update", "rollback", "fleet"):
        assert verb in bash and verb in zsh
