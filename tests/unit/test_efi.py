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
    assert names.index("mount-esp") < names.index("esp-record") < names.index("umount-esp") \
        < names.index("umount-boot")
    assert by["esp-record"].argv[5] == "imgbase-node-1.0-1"  # the record names the image
    _, fstab = by["layer-fstab"].write  # type: ignore[misc]
    assert "UUID=0A1B-2C3D /boot/efi vfat umask=0077,nofail 0 1" in fstab
    _, stub = by["esp-efi-boot-grub.cfg"].write  # type: ignore[misc]
    assert stub == efi.stub_cfg(UUID)
    assert "efi-boot-entry" not in names  # EFI variables not writable here
    entry = {s.name: s for s in plan_install(replace(facts, efi_vars=True)).steps}
    assert entry["efi-boot-entry"].argv[-1] == "\\EFI\\debian\\shimx64.efi"
    assert list(entry)[-1] == "efi-boot-entry"  # last: a firmware that refuses fails nothing


def test_grub_before_shim_in_each_directory() -> None:
    order = list(efi.FILES)
    for d in (efi.VENDOR, efi.REMOVABLE):
        shim = f"{d}/shimx64.efi" if d == efi.VENDOR else f"{d}/BOOTX64.EFI"
        assert order.index(f"{d}/grubx64.efi") < order.index(shim)


def test_sync_writes_the_chain_then_only_what_differs(tmp_path: Path) -> None:
    tree, esp = tree_with_chain(tmp_path / "tree"), tmp_path / "esp"
    esp.mkdir()
    assert not efi.ours(esp)  # an empty (or another system's) ESP is never written
    assert efi.repair(esp, tree, UUID) == tuple(efi.FILES)
    run_steps(efi.sync_steps(esp, tree, UUID, "n-1.0-1"), tmp_path)
    assert efi.ours(esp) and efi.stale(esp, tree) == [] and efi.damaged(esp) == []
    assert efi.repair(esp, tree, UUID) is None
    assert efi.read_record(esp)[0] == "n-1.0-1"
    assert (esp / "EFI/BOOT/BOOTX64.EFI").read_bytes() == (tree / efi.SOURCES["shim"]).read_bytes()
    assert (esp / "EFI/debian/grub.cfg").read_text() == efi.stub_cfg(UUID)
    assert not list(esp.rglob("*.new"))
    # a new grub: only the two grub copies differ; the shim files are not rewritten
    before = (esp / "EFI/debian/shimx64.efi").stat().st_mtime_ns
    (tree / efi.SOURCES["grub"]).write_bytes(b"grub v2\n")
    stale = efi.stale(esp, tree)
    assert stale == ["EFI/debian/grubx64.efi", "EFI/BOOT/grubx64.efi"]
    # the ESP holds a whole chain of another image: recover would not downgrade it
    assert efi.repair(esp, tree, UUID) is None
    run_steps(efi.sync_steps(esp, tree, UUID, "n-2.0-1"), tmp_path)
    assert (esp / "EFI/BOOT/grubx64.efi").read_bytes() == b"grub v2\n"
    assert (esp / "EFI/debian/shimx64.efi").stat().st_mtime_ns == before
    assert efi.read_record(esp)[0] == "n-2.0-1" and efi.damaged(esp) == []
    # torn or lost files are what recover mends, and a stub that finds no /boot
    (esp / "EFI/BOOT/BOOTX64.EFI").write_bytes(b"half a shim")
    (esp / "EFI/debian/mmx64.efi").unlink()
    assert efi.damaged(esp) == ["EFI/debian/mmx64.efi", "EFI/BOOT/BOOTX64.EFI"]
    assert efi.repair(esp, tree, UUID) == ("EFI/debian/mmx64.efi", "EFI/BOOT/BOOTX64.EFI")
    run_steps(efi.sync_steps(esp, tree, UUID, "n-2.0-1",
                             list(efi.repair(esp, tree, UUID) or ())), tmp_path)
    assert efi.damaged(esp) == [] and efi.stale(esp, tree) == []
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
    mine = EspFacts("x", True, chain_of="n-1", booted_base="n-1")
    assert check_esp(replace(base, esp=mine)).ok
    assert check_esp(replace(base, esp=EspFacts("x", True, ours=False))).ok  # not judged
    torn = replace(mine, damaged=("EFI/BOOT/BOOTX64.EFI",))
    result = check_esp(replace(base, esp=torn))
    assert not result.ok and "EFI/BOOT/BOOTX64.EFI" in result.detail
    assert "imgbase recover" in result.hint
    # whole, but not the booted image's although the record says it is
    assert not check_esp(replace(base, esp=replace(mine, differs=("EFI/BOOT/grubx64.efi",)))).ok
    # whole, a newer image's (after a fallback): fine, never downgraded
    newer = replace(mine, chain_of="n-2", differs=("EFI/BOOT/grubx64.efi",))
    assert check_esp(replace(base, esp=newer)).ok and "n-2" in check_esp(
        replace(base, esp=newer)).detail
    assert not check_esp(replace(base, esp=replace(mine, bad_stubs=efi.STUBS))).ok


def test_the_boot_entry_replaces_old_imgbase_entries_and_never_fails_the_install(
        tmp_path: Path) -> None:
    fake = tmp_path / "efibootmgr"
    log = tmp_path / "log"
    fake.write_text("#!/bin/sh\nif [ $# -eq 0 ]; then printf 'BootCurrent: 0001\\n"
                    "Boot0000* UiApp\\nBoot0001* imgbase\\tHD(2,GPT,x)\\nBoot0003* imgbase\\n"
                    "Boot0004* imgbase-other\\n'; exit 0; fi\n"
                    f"echo \"$*\" >> {log}\n[ \"$1 $2\" != '-q --create' ] || exit ${{FAIL:-0}}\n")
    fake.chmod(0o755)
    argv = efi.boot_entry_step("/dev/vdb", 2).argv
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    subprocess.run(argv, env=env, check=True)
    assert log.read_text().splitlines() == [
        "-q -b 0001 -B", "-q -b 0003 -B",
        "-q --create --disk /dev/vdb --part 2 --label imgbase --loader \\EFI\\debian\\shimx64.efi"]
    failed = subprocess.run(argv, env={**env, "FAIL": "1"}, capture_output=True, text=True)
    assert failed.returncode == 0 and "warning: no NVRAM boot entry" in failed.stderr
