"""The ESP: the install lays out shim -> signed grub from the image's tree, the update and
recover rewrite only what differs, each file atomically; the check sees what is wrong."""

from __future__ import annotations

import io
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from imgbase.bootloader import efi
from imgbase.errors import InputError
from imgbase.node.check import EspFacts, check_esp
from imgbase.node.install import plan_install
from imgbase.plan import Plan, execute
from imgbase.progress import Progress
from tests.unit.test_install_plan import FACTS

UUID = "0b2e5c59-57a2-4f4d-9b0a-3b7a5b6b1d1c"


def tree_with_chain(root: Path, tag: str = "v1") -> Path:
    for name, rel in efi.SOURCES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(f"{name} {tag}\n".encode() * 100)
    return root


def run_steps(steps: list, tmp_path: Path) -> None:  # type: ignore[type-arg]
    journal = tmp_path / "journal.jsonl"
    execute(Plan("esp", tuple(steps)), Progress(stream=io.StringIO()), journal)
    journal.unlink(missing_ok=True)


def test_install_formats_the_esp_and_copies_the_chain_from_the_layer() -> None:
    facts = replace(FACTS, boot_uuid=UUID, esp_id="0A1B2C3D")
    plan = plan_install(facts)
    by = {s.name: s for s in plan.steps}
    names = [s.name for s in plan.steps]
    assert by["mkfs-esp"].argv[-1] == "/dev/vdb2" and "0A1B2C3D" in by["mkfs-esp"].argv
    assert by["mkfs-boot"].argv[by["mkfs-boot"].argv.index("-U") + 1] == UUID
    copies = [s for s in plan.steps if s.argv[:3] == ("sh", "-c", efi.REPLACE)]
    assert {s.argv[-1].split("/efi/", 1)[1] for s in copies} == set(efi.FILES)
    assert all(s.argv[-2].startswith("/run/imgbase/install/root/usr/lib/") for s in copies)
    assert names.index("mount-esp") < names.index("esp-sync") < names.index("umount-esp") \
        < names.index("umount-boot")
    _, fstab = by["layer-fstab"].write  # type: ignore[misc]
    assert "UUID=0A1B-2C3D /boot/efi vfat umask=0077,nofail 0 1" in fstab
    _, stub = by["esp-efi-boot-grub.cfg"].write  # type: ignore[misc]
    assert stub == efi.stub_cfg(UUID)
    assert "efi-boot-entry" not in names  # EFI variables not writable here
    entry = {s.name: s for s in plan_install(replace(facts, efi_vars=True)).steps}
    assert entry["efi-boot-entry"].argv[-1] == "\\EFI\\debian\\shimx64.efi"


def test_grub_before_shim_in_each_directory() -> None:
    order = list(efi.FILES)
    for d in (efi.VENDOR, efi.REMOVABLE):
        shim = f"{d}/shimx64.efi" if d == efi.VENDOR else f"{d}/BOOTX64.EFI"
        assert order.index(f"{d}/grubx64.efi") < order.index(shim)


def test_sync_writes_the_chain_then_only_what_differs(tmp_path: Path) -> None:
    tree, esp = tree_with_chain(tmp_path / "tree"), tmp_path / "esp"
    esp.mkdir()
    assert efi.repair(esp, tree, UUID) == tuple(efi.FILES)
    run_steps(efi.sync_steps(esp, tree, UUID), tmp_path)
    assert efi.stale(esp, tree) == [] and efi.repair(esp, tree, UUID) is None
    assert (esp / "EFI/BOOT/BOOTX64.EFI").read_bytes() == (tree / efi.SOURCES["shim"]).read_bytes()
    assert (esp / "EFI/debian/grub.cfg").read_text() == efi.stub_cfg(UUID)
    assert not list(esp.rglob("*.new"))
    # a new grub: only the two grub copies differ; the shim files are not rewritten
    before = (esp / "EFI/debian/shimx64.efi").stat().st_mtime_ns
    (tree / efi.SOURCES["grub"]).write_bytes(b"grub v2\n")
    stale = efi.stale(esp, tree)
    assert stale == ["EFI/debian/grubx64.efi", "EFI/BOOT/grubx64.efi"]
    run_steps(efi.sync_steps(esp, tree, UUID), tmp_path)
    assert (esp / "EFI/BOOT/grubx64.efi").read_bytes() == b"grub v2\n"
    assert (esp / "EFI/debian/shimx64.efi").stat().st_mtime_ns == before
    (esp / "EFI/BOOT/grub.cfg").write_text("search --label x\n")
    assert efi.repair(esp, tree, UUID) == ()  # no file, but a stub to rewrite


def test_a_cut_between_copy_and_rename_leaves_the_old_file(tmp_path: Path) -> None:
    """The copy goes to NAME.new; NAME is only ever renamed over, never written into."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"old\n")
    new.write_bytes(b"new\n")
    target = tmp_path / "BOOTX64.EFI"
    target.write_bytes(b"old\n")
    # the first half of REPLACE, as a cut after the sync of the copy leaves it
    first = efi.REPLACE.split(" && mv")[0] + "; }"
    subprocess.run(["sh", "-c", first, "x", str(new), str(target)], check=True)
    assert target.read_bytes() == b"old\n" and Path(f"{target}.new").read_bytes() == b"new\n"
    subprocess.run(["sh", "-c", efi.REPLACE, "x", str(new), str(target)], check=True)
    assert target.read_bytes() == b"new\n" and not Path(f"{target}.new").exists()


def test_no_repair_from_a_tree_without_the_chain(tmp_path: Path) -> None:
    (tmp_path / "esp").mkdir()
    assert efi.repair(tmp_path / "esp", tmp_path, UUID) is None


@pytest.mark.parametrize("bad", ["", "x; reboot", UUID.upper(), UUID + "\nreboot"])
def test_stub_refuses_what_is_not_a_uuid(bad: str) -> None:
    with pytest.raises(InputError):
        efi.stub_cfg(bad)


def test_check_esp() -> None:
    from imgbase.node.check import CheckFacts

    base = CheckFacts(tagged_vgs=("vg",), layout=None)
    assert check_esp(base).ok
    assert not check_esp(replace(base, esp=EspFacts("fstab mounts it", False))).ok
    assert check_esp(replace(base, esp=EspFacts("x", True))).ok
    stale = EspFacts("x", True, stale=("EFI/BOOT/BOOTX64.EFI",))
    result = check_esp(replace(base, esp=stale))
    assert not result.ok and "EFI/BOOT/BOOTX64.EFI" in result.detail
    assert "imgbase recover" in result.hint
    assert check_esp(replace(base, esp=replace(stale, pending=True))).ok
    assert not check_esp(replace(base, esp=EspFacts("x", True, bad_stubs=efi.STUBS))).ok
