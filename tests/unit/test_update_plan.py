"""The update planner: a delta base from the closest one, /etc merged before the fstab is
written, kernel arguments carried, and the default changed by the very last step."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from imgbase.bootloader import grubenv
from imgbase.errors import InputError
from imgbase.image.info import image_info
from imgbase.node import update
from imgbase.plan import locked
from tests.unit.test_node_plans import NVR, node

FACTS = update.UpdateFacts(node=node(), image="/var/tmp/n-2.0-1.squashfs", nvr="n-2.0-1",
                           image_kargs=("console=ttyS0", "mitigations=auto"), origin=NVR,
                           fstab="LABEL=boot /boot ext4 defaults 0 2\n")


def names(plan: update.Plan) -> list[str]:
    return [s.name for s in plan.steps]


def test_delta_base_is_a_snapshot_synced_from_the_image() -> None:
    plan = update.plan_update(FACTS)
    n = names(plan)
    snap = plan.steps[n.index("base-snapshot")].argv
    assert snap[-1] == f"vg/{NVR}" and "n-2.0-1" in snap and "imgbase:incomplete" in snap
    sync = plan.steps[n.index("base-sync")].argv
    assert sync[1:4] == ("-P", "-m", "imgbase.node.treesync")  # the image dir, then the base's
    assert sync[4].endswith("update-image") and sync[5].endswith("update-base")
    # it mounts the image file and the new base itself: no separate mount steps
    assert sync[6:] == ("--mount", FACTS.image, f"/dev/vg/{FACTS.nvr}")
    assert n[:n.index("base-complete")] == ["base-snapshot", "base-sync", "base-deactivate"]
    assert n.index("base-sync") < n.index("base-complete") < n.index("layer-create")


def test_full_unpack_when_there_is_no_base_to_start_from() -> None:
    n = names(update.plan_update(replace(FACTS, origin=None)))
    assert "base-unpack" in n and "base-snapshot" not in n


def test_etc_merged_then_fstab_then_entry_and_the_default_last() -> None:
    plan = update.plan_update(FACTS)
    n = names(plan)
    assert n.index("layer-mount") < n.index("etc-merge") < n.index("layer-fstab")
    assert n.index("boot-entries") < n.index("layer-complete") < n.index("boot-default")
    assert n[-2:] == ["boot-default", "boot-commit"]  # the commit: so that GRUB sees it
    env = grubenv.parse(plan.steps[-2].write[1])  # type: ignore[index]
    assert env == {"saved_entry": "n-2.0-1+1", "imgbase_tries": "3",
                   "imgbase_fallback": f"{NVR}+1"}
    entries = plan.steps[n.index("boot-entries")].write[1]  # type: ignore[index]
    assert "root=/dev/vg/n-2.0-1+1 rw quiet console=ttyS0 mitigations=auto" in entries



def test_corrupt_image_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.squashfs"
    bad.write_bytes(b"hsqs" + b"\0" * 100)
    with pytest.raises(InputError, match="not a readable squashfs"):
        image_info(str(bad))


def test_a_second_operation_is_refused_while_one_runs(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    code = ("import sys; from pathlib import Path; from imgbase.plan import locked\n"
            "with locked(Path(sys.argv[1])): pass")
    with locked(lock):
        proc = subprocess.run([sys.executable, "-c", code, str(lock)], capture_output=True,
                              text=True)
    assert proc.returncode == 1 and "another imgbase operation is running (pid" in proc.stderr
    subprocess.run([sys.executable, "-c", code, str(lock)], check=True)  # free again


def test_check_reports_packages_etc_and_kargs_without_changing_anything(tmp_path: Path) -> None:
    def status(pkgs: dict[str, str]) -> str:
        return "\n".join(f"Package: {p}\nStatus: install ok installed\nVersion: {v}\n"
                         for p, v in pkgs.items())

    old = tmp_path / "root"
    for rel, text in {"usr/lib/sysimage/dpkg/status": status({"a": "1", "b": "1"}),
                      "usr/share/factory/etc/motd": "v1\n", "etc/motd": "local\n",
                      "usr/share/factory/etc/issue": "v1\n", "etc/issue": "v1\n"}.items():
        (old / rel).parent.mkdir(parents=True, exist_ok=True)
        (old / rel).write_text(text)
    new = tmp_path / "new"
    for rel, text in {"usr/lib/sysimage/dpkg/status": status({"b": "2", "c": "1"}),
                      "usr/share/factory/etc/motd": "v2\n",
                      "usr/share/factory/etc/issue": "v2\n"}.items():
        (new / rel).parent.mkdir(parents=True, exist_ok=True)
        (new / rel).write_text(text)
    image = tmp_path / "n-2.0-1.squashfs"
    subprocess.run(["mksquashfs", str(new), str(image), "-quiet", "-no-progress"], check=True)
    r = update.check_report(replace(FACTS, image=str(image)), tmp_path, root=old)
    assert r["packages"] == {"added": ["c"], "removed": ["a"], "changed": {"b": ["1", "2"]}}
    assert r["etc"]["conflicts"] == ["motd"] and r["etc"]["taken_new"] == ["issue"]
    assert r["kargs"] == ["rw", "quiet", "console=ttyS0", "mitigations=auto"]
    assert (old / "etc/motd").read_text() == "local\n"  # nothing changed
    assert "1 added, 1 removed, 1 changed" in update.render_report(r)


def test_space_is_the_bytes_of_the_changed_files_and_the_metadata_is_checked(
        tmp_path: Path) -> None:
    """Two real trees and their listings (as compose writes them): the delta needs the
    bytes of the files that differ, a full unpack all of them; pool metadata counts."""
    from imgbase.image.filelist import write_listing
    from tests.unit.test_node_plans import lv

    old, new = tmp_path / "old", tmp_path / "new"
    for tree in (old, new):
        (tree / "usr/lib/imgbase").mkdir(parents=True)
        (tree / "same").write_bytes(b"s" * 300_000)
        os.utime(tree / "same", (1, 1))
    (new / "changed").write_bytes(b"c" * 100_000)
    write_listing(old)
    write_listing(new)
    listing = "usr/lib/imgbase/files.tsv"
    old_text, new_text = (old / listing).read_text(), (new / listing).read_text()
    delta = update.space_needed(new_text, old_text, 10)
    full = update.space_needed(new_text, None, 10)
    assert 100_000 * 11 // 10 <= delta < 150_000  # the changed file, not the 300 kB one
    assert full >= 400_000 * 11 // 10
    assert update.space_needed(None, None, 1000) == 3000  # no listing: 3 x compressed
    pool = lv("pool", "twi-aotz--", data=50.0, meta=5.0)  # 512 MiB free
    update.check_pool_space(pool, 500 << 20)
    with pytest.raises(InputError, match="too full for the update: 512 MiB free, about 600"):
        update.check_pool_space(pool, 600 << 20)
    with pytest.raises(InputError, match="metadata is 95.0% full"):
        update.check_pool_space(lv("pool", "twi-aotz--", data=1.0, meta=95.0), 1)
