"""Bad input to `imgbase compose`: one-line error with a hint, exit != 0, nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, imgbase_cli

IMAGE = str(ROOT / "images/node.toml")


def assert_refused(proc: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("imgbase: error: ") and "(hint: " in lines[0], lines[0]
    for phrase in phrases:
        assert phrase in lines[0]


def snapshot(*dirs: Path) -> set[str]:
    return {str(p) for d in dirs if d.exists() for p in d.rglob("*")}


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def tiny_mount(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, or a read-only one with ro=True via the request param."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_missing_mmdebstrap_names_the_apt_package(tmp_path: Path, cache: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("dpkg-query", "dpkg-deb", "mksquashfs", "env"):
        os.symlink(shutil.which(tool), bindir / tool)  # type: ignore[arg-type]
    proc = imgbase_cli("compose", IMAGE, "-o", str(tmp_path / "out"), "--cache", str(cache),
                       env={"PATH": str(bindir)})
    assert_refused(proc, "mmdebstrap is not installed", "apt-get install mmdebstrap")
    assert snapshot(tmp_path / "out", cache) == set()


def test_missing_mksquashfs_names_squashfs_tools(tmp_path: Path, cache: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("dpkg-query", "dpkg-deb", "mmdebstrap"):
        os.symlink(shutil.which(tool), bindir / tool)  # type: ignore[arg-type]
    proc = imgbase_cli("compose", IMAGE, "-o", str(tmp_path / "out"), "--cache", str(cache),
                       env={"PATH": str(bindir)})
    assert_refused(proc, "mksquashfs is not installed", "squashfs-tools")


def test_not_root(tmp_path: Path, cache: Path) -> None:
    tmp_path.chmod(0o777)
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
         "-c", "import sys; sys.path.insert(0, sys.argv[1]); from imgbase.cli import main;"
         "sys.exit(main(sys.argv[2:]))", str(ROOT), "compose", IMAGE,
         "-o", str(tmp_path / "out"), "--cache", str(cache)],
        capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    if "Permission denied" in proc.stderr and "python" in proc.stderr.lower():
        pytest.skip(f"this Python is not usable by an unprivileged user: {sys.executable}")
    assert_refused(proc, "must run as root")
    assert snapshot(tmp_path / "out", cache) == set()


def test_output_dir_not_writable(tiny_mount: Path, cache: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_mount)], check=True)
    proc = imgbase_cli("compose", IMAGE, "-o", str(tiny_mount / "out"), "--cache", str(cache))
    assert_refused(proc, "output directory", "is not writable")
    assert snapshot(cache) == set()


def test_output_path_is_a_file(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "file").write_text("x")
    proc = imgbase_cli("compose", IMAGE, "-o", str(tmp_path / "file/out"), "--cache", str(cache))
    assert_refused(proc, "is a file")


def test_not_enough_free_disk(tiny_mount: Path, tmp_path: Path) -> None:
    proc = imgbase_cli("compose", IMAGE, "-o", str(tmp_path / "out"),
                       "--cache", str(tiny_mount / "cache"))
    assert_refused(proc, "not enough free space", "GiB needed")
    assert snapshot(tiny_mount, tmp_path / "out") == set()


def test_toml_error_through_the_cli(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[image]\nname = "x"\nversion = \n')
    proc = imgbase_cli("compose", str(bad), "-o", str(tmp_path / "out"))
    assert_refused(proc, "bad.toml:3", "TOML syntax error")
    assert not (tmp_path / "out").exists()


def test_unknown_backend(tmp_path: Path) -> None:
    img = tmp_path / "images/x.toml"
    img.parent.mkdir()
    text = (ROOT / "images/node.toml").read_text().replace('"mmdebstrap"', '"nix"')
    img.write_text(text.replace('layers = [', 'layer_dir = "%s"\nlayers = [' % (ROOT / "layers")))
    proc = imgbase_cli("compose", str(img), "-o", str(tmp_path / "out"))
    assert_refused(proc, "unknown compose backend 'nix'", "available: mmdebstrap")


@pytest.mark.slow
def test_unknown_package_names_package_and_layer(tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    shutil.copytree(ROOT / "layers", layers)
    virt = layers / "virt.toml"
    virt.write_text(virt.read_text().replace('"qemu-utils"', '"qemu-utils", "qemu-utilz"'))
    img = tmp_path / "node.toml"
    img.write_text((ROOT / "images/node.toml").read_text().replace(
        "layers = [", f'layer_dir = "{layers}"\nlayers = ['))
    out = tmp_path / "out"
    proc = imgbase_cli("compose", str(img), "-o", str(out))
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "unknown package 'qemu-utilz' in layer 'virt'" in line and "(hint: " in line
    assert sorted(p.name for p in out.iterdir()) == ["imgbase-node-1.0-1.compose.log"]
