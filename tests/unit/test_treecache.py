"""The package-tree cache on real directories and a real overlayfs mount (host kernel)."""

from __future__ import annotations

import os
from pathlib import Path

from imgbase.compose import treecache
from imgbase.compose.chroot import mounts_under

EPOCH = 1_700_000_000


def _tree(path: Path, marker: str) -> Path:
    (path / "var/lib/dpkg").mkdir(parents=True)
    (path / "var/lib/dpkg/status").write_text("Package: a\n")
    (path / "etc").mkdir()
    (path / "etc/hostname").write_text(marker)
    os.link(path / "etc/hostname", path / "etc/hostname.link")
    return path


def test_a_kept_tree_is_moved_clamped_and_the_oldest_pushed_out(tmp_path: Path) -> None:
    trees = tmp_path / "cache/trees"
    (trees / ".retired-0-1/x").mkdir(parents=True)  # left by a killed compose
    for i, key in enumerate(("old", "mid")):
        entry = _tree(trees / key, key)
        os.utime(entry, (EPOCH + i, EPOCH + i))
    built = _tree(tmp_path / "cache/work/packages", "new")
    entry, remover = treecache.store(trees, "new", built, EPOCH)
    remover.join()
    assert entry == trees / "new" and not built.exists()
    assert sorted(p.name for p in trees.iterdir()) == ["mid", "new"]  # KEPT = 2
    assert (entry / "etc/hostname").read_text() == "new"
    assert all(os.lstat(p).st_mtime <= EPOCH for p in entry.rglob("*"))

    again = _tree(tmp_path / "cache/work/packages", "rebuilt")  # --rebuild: same key
    entry, remover = treecache.store(trees, "new", again, EPOCH)
    remover.join()
    assert sorted(p.name for p in trees.iterdir()) == ["mid", "new"]
    assert (entry / "etc/hostname").read_text() == "rebuilt"
    assert treecache.lookup(trees, "mid") == trees / "mid"
    assert treecache.lookup(trees, "absent") is None


def test_the_overlay_writes_beside_the_kept_tree(tmp_path: Path) -> None:
    cache = tmp_path / "ca,che:dir"  # overlayfs splits its options on these
    lower = _tree(cache / "trees/key", "kept")
    work = cache / "work/build.1"
    work.mkdir(parents=True)
    merged = work / "tree"
    with treecache.overlay(lower, work, merged) as tree:
        assert mounts_under(merged) == [str(merged)]
        (tree / "etc/hostname").write_text("changed")
        (tree / "etc/hostname.link").unlink()
        (tree / "usr/lib/sysimage").mkdir(parents=True)
        os.rename(tree / "var/lib/dpkg", tree / "usr/lib/sysimage/dpkg")  # a directory
        (tree / "new").write_text("layer")
        assert (tree / "usr/lib/sysimage/dpkg/status").read_text() == "Package: a\n"
    assert mounts_under(merged) == []
    assert (lower / "etc/hostname").read_text() == "kept"
    assert os.lstat(lower / "etc/hostname").st_nlink == 2
    assert (lower / "var/lib/dpkg/status").exists() and not (lower / "new").exists()
    assert (work / "upper/new").read_text() == "layer"
