"""imgbase as a Debian package: contents, metadata, reproducibility."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imgbase
from imgbase.compose import debpkg


def test_deb_carries_code_commands_and_boot_assets(tmp_path: Path) -> None:
    deb = debpkg.build_deb(tmp_path, 1700000000)
    assert deb.name == f"imgbase_{imgbase.__version__}_all.deb"
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    for path in ("./usr/bin/imgbase", "./usr/bin/imgbase-agent",
                 "./usr/lib/python3/dist-packages/imgbase/cli.py",
                 "./usr/share/initramfs-tools/hooks/imgbase",
                 "./usr/share/initramfs-tools/scripts/local-bottom/imgbase-live",
                 "./usr/share/initramfs-tools/scripts/local-block/imgbase-rescue",
                 "./usr/share/initramfs-tools/scripts/local-bottom/imgbase-rescue"):
        assert path in listing, path
    assert "root/root" in listing and "2023-11-14" in listing  # owner and clamped mtime
    field = subprocess.run(["dpkg-deb", "-f", str(deb), "Version", "Depends"],
                           capture_output=True, text=True, check=True).stdout
    assert f"Version: {imgbase.__version__}" in field and "lvm2" in field


def test_deb_is_reproducible(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = debpkg.build_deb(tmp_path / "a", 1)
    b = debpkg.build_deb(tmp_path / "b", 1)
    assert a.read_bytes() == b.read_bytes()


def test_source_digest_is_stable() -> None:
    assert debpkg.source_digest() == debpkg.source_digest()


def test_tree_digest_tracks_contents_modes_and_names(tmp_path: Path) -> None:
    """The digest behind the compose cache key changes with every kind of edit."""
    from imgbase.image.spec import tree_digest

    (tmp_path / "pkg").mkdir()
    f = tmp_path / "pkg/mod.py"
    f.write_text("a = 1\n")
    seen = {tree_digest(tmp_path)}
    f.write_text("a = 2\n")
    seen.add(tree_digest(tmp_path))
    f.chmod(0o755)
    seen.add(tree_digest(tmp_path))
    f.rename(tmp_path / "pkg/other.py")
    seen.add(tree_digest(tmp_path))
    (tmp_path / "pkg/empty").mkdir()
    seen.add(tree_digest(tmp_path))
    assert len(seen) == 5
