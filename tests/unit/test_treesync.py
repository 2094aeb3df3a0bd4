"""The delta sync of an update, on real trees: listings in, a tree equal to the image out.

Equality is judged by rsync itself (--checksum, -aHAX, itemized, nothing filtered): any
difference in contents, mode, owner, mtime (directories included), xattrs, hard links or
presence is a line of output.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from imgbase.image.filelist import LISTING, listing, read_listing, unescape, write_listing
from imgbase.node.treesync import main, sync
from imgbase.run import run

EPOCH = 1_700_000_000


def differences(image: Path, base: Path) -> list[str]:
    out = run(["rsync", "-aHAXn", "--checksum", "--delete", "--numeric-ids",
               "--itemize-changes", f"{image}/", f"{base}/"]).stdout
    return out.splitlines()


def make(root: Path, spec: dict[str, str]) -> None:
    """Paths -> "dir", "->target" (symlink), "=other" (hard link) or file text."""
    for rel, what in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if what == "dir":
            path.mkdir(exist_ok=True)
        elif what.startswith("->"):
            os.symlink(what[2:], path)
        elif what.startswith("="):
            os.link(root / what[1:], path)
        else:
            path.write_text(what)


def clamp(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (EPOCH, EPOCH), follow_symlinks=False)
    os.utime(root, (EPOCH, EPOCH))


V1 = {
    "usr/bin/tool": "#!/bin/sh\necho v1\n", "usr/bin/same": "unchanged " * 1000,
    "usr/share/doc/a/readme": "aaaa", "usr/share/doc/gone/file": "bye",
    "usr/lib/link-a": "linked", "usr/lib/link-b": "=usr/lib/link-a",
    "usr/lib/will-link": "same bytes", "etc/alt": "->/usr/bin/tool",
    "etc/becomes-dir": "file", "etc/becomes-file/x": "in a dir", "etc/mode": "m",
    "etc/owner": "o", "etc/attr": "x", "var/empty": "dir",
}


def v2_from(root: Path) -> None:
    """v2: every kind of change, on a copy of v1 (clamped again after)."""
    (root / "usr/bin/tool").write_text("#!/bin/sh\necho v2\n")  # same size
    shutil.rmtree(root / "usr/share/doc/gone")
    make(root, {"usr/share/doc/new/file": "hello", "usr/lib/will-link2": "=usr/lib/will-link"})
    (root / "usr/lib/link-b").unlink()
    (root / "usr/lib/link-b").write_text("linked")  # the link broken, same content
    (root / "etc/alt").unlink()
    os.symlink("/usr/bin/same", root / "etc/alt")
    (root / "etc/becomes-dir").unlink()
    make(root, {"etc/becomes-dir/y": "now a dir"})
    shutil.rmtree(root / "etc/becomes-file")
    (root / "etc/becomes-file").write_text("now a file")
    os.chmod(root / "etc/mode", 0o600)
    os.chown(root / "etc/owner", 1234, 5678)
    os.setxattr(root / "etc/attr", "trusted.imgbase-test", b"v2")
    # names as they come: not UTF-8 (passed to rsync as bytes), a tab, a newline
    for name in (b"usr/share/doc/caf\xe9", b"usr/share/doc/a\tb", b"usr/share/doc/c\nd"):
        (root / os.fsdecode(name)).write_text("odd name")


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    image, base = tmp_path / "image", tmp_path / "base"
    make(base, V1)
    os.setxattr(base / "etc/attr", "trusted.imgbase-test", b"v1")
    clamp(base)
    write_listing(base)
    shutil.copytree(base, image, symlinks=True)  # hard links become copies: relink
    (image / "usr/lib/link-b").unlink()
    os.link(image / "usr/lib/link-a", image / "usr/lib/link-b")
    v2_from(image)
    clamp(image)
    write_listing(image)
    assert differences(image, base)  # the test means something
    return image, base


def test_the_delta_makes_the_base_equal_to_the_image(trees: tuple[Path, Path]) -> None:
    image, base = trees
    same = (base / "usr/bin/same").stat().st_ino
    how = sync(image, base)
    assert how.startswith("delta: ")
    assert differences(image, base) == []
    assert (base / "usr/bin/same").stat().st_ino == same  # unchanged: not rewritten
    assert (base / "usr/lib/will-link").stat().st_ino == \
        (base / "usr/lib/will-link2").stat().st_ino
    assert (base / "usr/lib/link-b").stat().st_nlink == 1
    assert read_listing(base) == read_listing(image)


def test_without_a_listing_it_is_the_whole_tree(trees: tuple[Path, Path]) -> None:
    image, base = trees
    (base / LISTING).unlink()
    assert sync(image, base).startswith("whole tree")
    assert differences(image, base) == []


def test_a_stale_listing_is_caught_by_the_comparison(trees: tuple[Path, Path]) -> None:
    """The control: the sync trusts the listings, so a listing that lies leaves a base
    that differs -- and the check used above sees it."""
    image, base = trees
    (image / "usr/bin/same").write_text("changed behind the listing's back")
    sync(image, base)
    assert [d for d in differences(image, base) if d.endswith("usr/bin/same")]


def test_the_listing_lists_every_path_but_itself(trees: tuple[Path, Path]) -> None:
    image, _ = trees
    lines = read_listing(image)
    assert lines == listing(image)
    paths = {unescape(line.split("\t", 1)[0]) for line in lines or []}
    walked = {str(p.relative_to(image)) for p in image.rglob("*")}
    assert paths == walked - {LISTING} | {"./"}
    assert os.lstat(image / LISTING).st_mtime == EPOCH  # writing it moved no mtime


def test_bad_arguments_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    assert main([str(tmp_path), str(tmp_path / "nothere")]) == 2
    assert "usage" in capsys.readouterr().err


def test_a_base_that_cannot_be_mounted_fails_with_mounts_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, base = tmp_path / "image", tmp_path / "base"
    rc = main([str(image), str(base), "--mount", str(tmp_path / "v2.squashfs"),
               "/dev/imgbase-test-nothere"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("mount failed") and err.count("\n") == 1, err
    assert "/dev/imgbase-test-nothere" in err


def add_line(tree: Path, path: str) -> None:
    """A listing line of a file named path, as a crafted image would carry."""
    with open(tree / LISTING, "a", encoding="utf-8") as f:
        f.write("\t".join((path, "f", "644", "0", "0", str(EPOCH), "6", "x", "-", "-")) + "\n")


@pytest.mark.parametrize("side", ["image", "base"])  # a path to copy, a path to remove
@pytest.mark.parametrize("path", ["../victim", "{tmp}/victim", "usr/../../victim"])
def test_a_listing_path_out_of_the_tree_is_refused(
        trees: tuple[Path, Path], side: str, path: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    image, base = trees
    victim = image.parent / "victim"
    victim.write_text("host's")
    add_line(image if side == "image" else base, path.format(tmp=image.parent))
    assert main([str(image), str(base)]) == 1
    err = capsys.readouterr().err
    assert "listing" in err and "not to be trusted" in err and err.count("\n") == 1, err
    assert victim.read_text() == "host's"
    assert not (image.parent / "base/victim").exists()


def test_a_removal_does_not_follow_a_symlink_of_the_base(trees: tuple[Path, Path]) -> None:
    """A path the listings say is gone, under a directory that is a symlink out of the
    base by now: not in the base, so nothing is removed (the link's target least of all)."""
    image, base = trees
    outside = base.parent / "outside"
    make(outside, {"doc/gone/file": "host's"})
    shutil.rmtree(base / "usr/share")
    os.symlink(outside, base / "usr/share")
    sync(image, base)
    assert (outside / "doc/gone/file").read_text() == "host's"
