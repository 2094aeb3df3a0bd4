"""The install planner is pure: facts in, steps out."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgbase.errors import InputError
from imgbase.install import InstallFacts, gather_facts, plan_install
from tests.conftest import imgbase_cli

FACTS = InstallFacts(disk="/dev/vdb", disk_size=20 << 30, image="/dev/vda",
                     nvr="imgbase-node-1.0-1", kernel="6.1.0-56-cloud-amd64",
                     kernel_args=("console=ttyS0,115200",))


def step(steps: list, name: str):  # type: ignore[no-untyped-def]
    return next(s for s in steps if s.name == name)


def test_plan_makes_base_readonly_then_layer() -> None:
    steps = plan_install(FACTS)
    names = [s.name for s in steps]
    assert names.index("unpack") < names.index("base-readonly") < names.index("layer")
    assert names[-1] == "deactivate" and names[0] == "wipe"
    layer = step(steps, "layer").argv
    assert "imgbase-node-1.0-1+1" in layer and "imgbase:layer" in layer
    assert step(steps, "base-readonly").argv[-1] == "imgbase/imgbase-node-1.0-1"


def test_fstab_has_layer_root_and_var_with_discard() -> None:
    path, text = step(plan_install(FACTS), "fstab").write  # type: ignore[misc]
    assert path.endswith("/root/etc/fstab")
    assert "/dev/imgbase/imgbase-node-1.0-1+1 / ext4 defaults,discard 0 1" in text
    assert "/dev/imgbase/var /var ext4 defaults,discard 0 2" in text


def test_boot_entry_boots_the_layer_with_image_kargs() -> None:
    _, entry = step(plan_install(FACTS), "grub-entries").write  # type: ignore[misc]
    assert "--id 'imgbase-node-1.0-1+1'" in entry
    assert "root=/dev/imgbase/imgbase-node-1.0-1+1 rw console=ttyS0,115200" in entry
    assert step(plan_install(FACTS), "grub-default").argv[-1] == \
        "saved_entry=imgbase-node-1.0-1+1"


def test_nist_profile_adds_tagged_volumes() -> None:
    from dataclasses import replace

    steps = plan_install(replace(FACTS, volumes="nist", pool_size="15G"))
    volumes = [s for s in steps if s.name.startswith("volume-")]
    assert [s.argv[s.argv.index("-n") + 1] for s in volumes] == [
        "var", "var_log", "var_log_audit", "var_crash", "var_tmp", "home", "tmp"]
    assert all("imgbase:volume" in s.argv for s in volumes)
    assert "15G" in step(steps, "pool").argv


def test_nvme_partitions() -> None:
    from dataclasses import replace

    steps = plan_install(replace(FACTS, disk="/dev/nvme0n1"))
    assert step(steps, "pv").argv[-1] == "/dev/nvme0n1p4"


def test_bad_nvr_is_refused() -> None:
    from dataclasses import replace

    with pytest.raises(InputError, match="not a name-version-release"):
        plan_install(replace(FACTS, nvr="node"))


def test_missing_disk_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such disk"):
        gather_facts(str(tmp_path / "nope"), "/dev/null", volumes="minimal", pool_size=None,
                     wipe=False)


def test_regular_file_is_not_a_disk(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    proc = imgbase_cli("install", "--disk", str(tmp_path / "f"), "/dev/null")
    assert proc.returncode == 2 and "is not a block device" in proc.stderr
    assert (tmp_path / "f").read_text() == "x"
