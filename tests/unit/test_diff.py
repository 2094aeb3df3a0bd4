"""`imgbase diff` names the files that differ between two images."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import imgbase_cli


def squash(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    tree = tmp_path / f"{name}-tree"
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
        os.utime(tree / rel, (1000, 1000))
    out = tmp_path / f"{name}.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(out), "-quiet", "-no-progress", "-noappend",
                    "-all-time", "1000"], check=True)
    return out


def test_diff_names_changed_added_and_removed_files(tmp_path: Path) -> None:
    a = squash(tmp_path, "a", {"etc/same": "x", "etc/changed": "1", "usr/gone": "g"})
    b = squash(tmp_path, "b", {"etc/same": "x", "etc/changed": "2", "usr/new": "n"})
    proc = imgbase_cli("diff", str(a), str(b), "--json")
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["differing"] == [
        "/etc/changed", "/usr/gone", "/usr/new"]


def test_diff_of_identical_images(tmp_path: Path) -> None:
    a = squash(tmp_path, "a", {"etc/same": "x"})
    b = squash(tmp_path, "b", {"etc/same": "x"})
    proc = imgbase_cli("diff", str(a), str(b))
    assert (proc.returncode, proc.stdout.strip()) == (0, "identical contents")
