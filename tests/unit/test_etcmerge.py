"""The 3-way /etc merge on real directory trees."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from imgbase.node.etcmerge import merge


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text.startswith("->"):
            os.symlink(text[2:], path)
        else:
            path.write_text(text)
    return root


def test_three_way_merge(tmp_path: Path) -> None:
    base = {"motd": "v1", "same": "s", "edited": "a", "gone-in-v2": "x", "both": "o",
            "passwd": "root:x:0:0\n", "link": "->motd"}
    old_factory = tree(tmp_path / "of", base)
    old_etc = tree(tmp_path / "oe", {**base, "edited": "local edit", "both": "mine",
                                     "admin.conf": "new file",
                                     "passwd": "root:x:0:0\nann:x:1001:1001\n"})
    os.chmod(old_etc / "motd", 0o600)  # a local mode change is a local change
    new = {"motd": "v2", "same": "s", "edited": "a", "both": "theirs", "added-in-v2": "n",
           "passwd": "root:x:0:0\nlibvirt:x:120:120\n", "link": "->same"}
    new_factory = tree(tmp_path / "nf", new)
    target = tmp_path / "t"
    shutil.copytree(new_factory, target, symlinks=True)
    report = merge(old_factory, old_etc, new_factory, target)
    assert (target / "edited").read_text() == "local edit"  # kept local
    # changed on both sides (local: mode, image: content): a conflict, local wins
    assert (target / "motd").read_text() == "v1"
    assert (target / "motd").stat().st_mode & 0o777 == 0o600
    assert (target / "added-in-v2").read_text() == "n"
    assert not (target / "gone-in-v2").exists() and report.removed == ["gone-in-v2"]
    assert (target / "admin.conf").read_text() == "new file"
    assert os.readlink(target / "link") == "same" and "link" in report.taken_new
    assert report.conflicts == ["both", "motd"] and (target / "both").read_text() == "mine"
    assert (target / "passwd").read_text() == (
        "root:x:0:0\nlibvirt:x:120:120\nann:x:1001:1001\n")
    assert report.accounts_kept == ["passwd:ann"]
    saved = json.loads((target / "imgbase/etc-merge.json").read_text())
    assert saved["conflicts"] == ["both", "motd"]
    assert report.kept_local == ["admin.conf", "edited"]


def test_take_new_policy_resolves_conflicts_for_the_image(tmp_path: Path) -> None:
    of = tree(tmp_path / "of", {"c": "o"})
    oe = tree(tmp_path / "oe", {"c": "mine"})
    nf = tree(tmp_path / "nf", {"c": "theirs"})
    target = tmp_path / "t"
    shutil.copytree(nf, target)
    assert merge(of, oe, nf, target, policy="take-new").conflicts == ["c"]
    assert (target / "c").read_text() == "theirs"


def test_the_module_runs_as_the_update_runs_it(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """update runs `python3 -P -m imgbase.node.etcmerge ...` (no CLI import): same merge."""
    from imgbase.node.etcmerge import main

    of = tree(tmp_path / "of", {"a": "v1", "b": "v1"})
    oe = tree(tmp_path / "oe", {"a": "mine", "b": "mine"})
    nf = tree(tmp_path / "nf", {"a": "v1", "b": "v2"})
    target = tmp_path / "t"
    shutil.copytree(nf, target)
    assert main([str(of), str(oe), str(nf), str(target)]) == 0
    assert (target / "a").read_text() == "mine"  # only local changed it
    assert (target / "b").read_text() == "mine"  # both did: conflict, local kept
    assert "conflict: /etc/b (keep-local)" in capsys.readouterr().out
    assert main([str(of), str(oe)]) == 2
    assert main([str(of), str(oe), str(nf), str(target), "whatever"]) == 2


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under root with its contents (files) or link target (symlinks)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = (os.readlink(p) if p.is_symlink() else
                    p.read_bytes() if p.is_file() else "dir")
    return out


def test_a_directory_the_new_image_makes_an_absolute_symlink_is_not_written_through(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The update runs the merge outside any chroot: /etc/x -> /somewhere in the new
    image must not put the local edits of /etc/x/* into the running system's /somewhere."""
    from imgbase.node.etcmerge import main

    host = tmp_path / "host"  # the running system's directory the link names
    tree(host, {"keep": "host's own"})
    before = snapshot(host)
    of = tree(tmp_path / "of", {"x/conf": "v1", "x/gone": "g", "y/conf": "y"})
    oe = tree(tmp_path / "oe", {"x/conf": "local edit", "x/mine": "admin's", "y/conf": "y"})
    nf = tree(tmp_path / "nf", {"x": f"->{host}", "y/conf": "y"})
    target = tmp_path / "t"
    shutil.copytree(nf, target, symlinks=True)
    assert main([str(of), str(oe), str(nf), str(target)]) == 0
    assert snapshot(host) == before  # nothing written, nothing removed there
    assert os.readlink(target / "x") == str(host)  # the image's link stays
    report = json.loads((target / "imgbase/etc-merge.json").read_text())
    assert report["skipped"] == ["x/conf", "x/mine"]
    assert "skipped: /etc/x/conf" in capsys.readouterr().out


def test_an_account_database_or_report_dir_that_is_a_symlink_is_not_written_through(
        tmp_path: Path) -> None:
    host = tmp_path / "host"
    tree(host, {"passwd": "host's\n", "etc-merge.json": "host's\n"})
    before = snapshot(host)
    of = tree(tmp_path / "of", {"passwd": "root:x:0:0\n"})
    oe = tree(tmp_path / "oe", {"passwd": "root:x:0:0\nann:x:1001:1001\n"})
    nf = tree(tmp_path / "nf", {"passwd": "root:x:0:0\n"})
    target = tmp_path / "t"
    shutil.copytree(nf, target)
    (target / "passwd").unlink()
    os.symlink(host / "passwd", target / "passwd")  # replaced, not written through
    merge(of, oe, nf, target)
    assert (target / "passwd").read_text() == "root:x:0:0\nann:x:1001:1001\n"
    assert not (target / "passwd").is_symlink()
    shutil.rmtree(target / "imgbase")
    os.symlink(host, target / "imgbase")
    from imgbase.intree import NotInside

    with pytest.raises(NotInside):
        merge(of, oe, nf, target)
    assert snapshot(host) == before
