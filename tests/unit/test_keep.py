"""The keep set of recover and gc, and their refusals when the menu cannot be read.

Pure: NodeFacts built by hand (tests/unit/test_node_plans.py's node()), one per kept
class, each with a control that the planner does remove, so a class that stops being
kept fails its test. The refusals use the real readers on real files where they can.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from imgbase import bootloader
from imgbase.bootloader import grubenv
from imgbase.errors import InputError
from imgbase.image.trust import Verified
from imgbase.node import boot, gc, layers, recover, rollback, update
from imgbase.node.facts import NodeFacts, boot_unmounted
from imgbase.node.keep import keep_set
from tests.unit.test_node_plans import NVR, lv, node

A = f"{NVR}+1"  # booted, base n-1.0-1
OLD, OTHER = "n-0.5-1", "n-0.6-1"  # bases older than the booted one
NEW = "n-2.0-1"  # a newer base


def with_bases(*bases: str, entries: bool = True, **env: str) -> NodeFacts:
    """The booted node plus one layer (<base>+1) on each base, each with its entry."""
    extra = []
    for base in bases:
        extra += [lv(base, "Vri---tz-k", tags="imgbase:base"),
                  lv(f"{base}+1", origin=base, tags="imgbase:layer")]
    f = node(*extra, entries=(A, *(f"{b}+1" for b in bases if entries)))
    return replace(f, env={"saved_entry": A, **env})


def gc_removed(f: NodeFacts, history: list[dict[str, Any]] | None = None) -> list[str]:
    # keep 1 by count: the booted image (found healthy last); the others only by the keep set
    history = [*(history or []), {"event": "health", "layer": A, "good": True, "time": 100}]
    return [s.argv[-1].split("/")[-1] for s in gc.plan_gc(f, 1, history).steps
            if s.argv[:1] == ("lvremove",)]


def recover_removed(f: NodeFacts, history: list[dict[str, Any]] | None = None) -> list[str]:
    return [s.argv[-1].split("/")[-1] for s in recover.plan_recover(
        f, [], [], history=history or []).steps if s.argv[:1] == ("lvremove",)]


# -- gc: each kept class, against a control base that goes ----------------------------

@pytest.mark.parametrize("env", [{"saved_entry": f"{OLD}+1"}, {"next_entry": f"{OLD}+1"},
                                 {"imgbase_fallback": f"{OLD}+1", "imgbase_tries": "2"}],
                         ids=["default", "next-boot", "fallback"])
def test_gc_keeps_the_layers_grubenv_names(env: dict[str, str]) -> None:
    removed = gc_removed(with_bases(OLD, OTHER, **env))
    assert removed == [f"{OTHER}+1", OTHER]


def test_gc_keeps_a_staged_layer_but_not_an_abandoned_one() -> None:
    f = with_bases(NEW, OTHER)  # n-2.0-1+1: complete, its entry written, never booted
    assert gc_removed(f) == [f"{OTHER}+1", OTHER]
    abandoned = [{"event": "abandoned", "layer": f"{NEW}+1"}]
    assert sorted(gc_removed(f, abandoned)) == sorted([f"{OTHER}+1", OTHER, f"{NEW}+1", NEW])
    # still being made (tagged incomplete): not staged, recover's to deal with
    f = replace(f, layout=replace(f.layout, lvs=tuple(
        replace(x, tags=x.tags | {"imgbase:incomplete"}) if x.name == f"{NEW}+1" else x
        for x in f.layout.lvs)))
    assert f"{NEW}+1" in gc_removed(f)


def test_gc_keeps_the_last_good_layer() -> None:
    good = [{"event": "health", "layer": f"{OTHER}+1", "good": True, "time": 40},
            {"event": "health", "layer": f"{OLD}+1", "good": True, "time": 50}]
    assert gc_removed(with_bases(OLD, OTHER), good) == [f"{OTHER}+1", OTHER]


# -- recover: the same set; its own removals (no entry, incomplete, retired) ----------

@pytest.mark.parametrize("env", [{"saved_entry": f"{OLD}+1"}, {"next_entry": f"{OLD}+1"},
                                 {"imgbase_fallback": f"{OLD}+1", "imgbase_tries": "1"}],
                         ids=["default", "next-boot", "fallback"])
def test_recover_never_removes_a_layer_grubenv_names(env: dict[str, str]) -> None:
    f = with_bases(OLD, OTHER, entries=False, **env)  # no entries: both look like leftovers
    assert recover_removed(f) == [f"{OTHER}+1"]


def test_recover_keeps_the_last_good_layer() -> None:
    good = [{"event": "health", "layer": f"{OLD}+1", "good": True, "time": 50}]
    assert recover_removed(with_bases(OLD, OTHER, entries=False), good) == [f"{OTHER}+1"]


def test_recover_keeps_a_staged_layer_whatever_its_tags() -> None:
    f = with_bases(NEW, OTHER)
    f = replace(f, layout=replace(f.layout, lvs=tuple(
        replace(x, attr="Vwi-a-tz--", tags=x.tags | {"imgbase:retired"})
        if x.name in (f"{NEW}+1", f"{OTHER}+1") else x for x in f.layout.lvs)))
    assert recover_removed(f) == [f"{OTHER}+1"]


def test_the_keep_set_says_why() -> None:
    f = with_bases(OLD, NEW, next_entry=f"{OLD}+1")
    kept = dict(keep_set(f, []).why)
    assert kept[A] == "booted" and kept[NVR] == f"the base of {A} (booted)"
    assert kept[f"{OLD}+1"] == "the next boot" and kept[f"{NEW}+1"] == "staged"


# -- refusals: the menu cannot be read ------------------------------------------------

def test_the_guest_case_boot_unmounted_after_set_default_is_refused(tmp_path: Path) -> None:
    """layer --add, boot --set-default of the new layer, umount /boot, recover --dry-run:
    what NodeFacts.gather reads then (an empty /boot directory of the root fs)."""
    b = f"{NVR}+2"
    f = node(lv(b, origin=NVR, tags="imgbase:layer"), entries=(A, b))
    f = replace(f, env={"saved_entry": b, "imgbase_tries": "3", "imgbase_fallback": A})
    before = [s.argv[-1] for s in recover.plan_recover(f, [], []).steps if s.argv]
    assert not any("lvremove" in a for a in before)
    entries, problem = bootloader.read_menu(tmp_path)
    assert entries == {} and problem == f"there is no {tmp_path}/grub/imgbase-entries.cfg"
    unmounted = boot_unmounted("LABEL=boot /boot ext4 defaults 0 2\n", Path("/boot"), False)
    seen = replace(f, env={}, entries=entries, unmounted=unmounted, menu_problem=problem)
    for plan in (lambda: recover.plan_recover(seen, [], []), lambda: gc.plan_gc(seen, 1, [])):
        with pytest.raises(InputError, match="/boot is not mounted") as exc:
            plan()
        assert exc.value.hint == "mount /boot, then run this again"
    mounted_but_empty = replace(seen, unmounted=None)
    with pytest.raises(InputError, match="cannot read the boot menu: there is no"):
        recover.plan_recover(mounted_but_empty, [], [])


@pytest.mark.parametrize(("text", "problem"), [
    ("menuentry 'imgbase x' {\n", "text that is not an imgbase menu entry"),
    (bootloader.grub.entry(A, f"/dev/vg/{A}", "rw") + "}\n", "not an imgbase menu entry"),
    (bootloader.grub.entry(A, f"/dev/vg/{A}", "rw").replace("rw", "rw a'b"),
     "a word GRUB does not read literally: \"a'b\""),
], ids=["truncated", "stray-brace", "bad-argument"])
def test_an_entries_file_that_does_not_parse_is_refused(tmp_path: Path, text: str,
                                                         problem: str) -> None:
    (tmp_path / "grub").mkdir()
    (tmp_path / "grub/grubenv").write_text(grubenv.render({"saved_entry": A}))
    (tmp_path / "grub/imgbase-entries.cfg").write_text(text)
    entries, found = bootloader.read_menu(tmp_path)
    assert found is not None and problem in found
    f = replace(node(lv(f"{NVR}+2", origin=NVR, tags="imgbase:layer")), entries=entries,
                boot=tmp_path, menu_problem=found)
    for plan in (lambda: recover.plan_recover(f, [], []), lambda: gc.plan_gc(f, 1, [])):
        with pytest.raises(InputError, match="cannot read the boot menu") as exc:
            plan()
        assert "nothing was removed" in (exc.value.hint or "")


def test_a_good_menu_and_a_fresh_one_read_apart(tmp_path: Path) -> None:
    (tmp_path / "grub").mkdir()
    assert bootloader.read_entries(tmp_path) == {}  # no file: status shows no entries
    text = bootloader.grub.entry(A, f"/dev/vg/{A}", "rw console=ttyS0,115200n8")
    (tmp_path / "grub/imgbase-entries.cfg").write_text(text)
    assert bootloader.read_menu(tmp_path) == (
        {A: text}, f"there is no {tmp_path}/grub/grubenv")
    (tmp_path / "grub/grubenv").write_text(grubenv.render({"imgbase_tries": "1"}))
    assert "names no default layer" in str(bootloader.read_menu(tmp_path)[1])
    (tmp_path / "grub/grubenv").write_text(grubenv.render({"saved_entry": A}))
    assert bootloader.read_menu(tmp_path) == ({A: text}, None)


# -- every /boot writer refuses when /boot is not mounted -----------------------------

def test_every_boot_writer_refuses_when_boot_is_not_mounted(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    f = replace(with_bases(OLD), unmounted="/boot is not mounted (/etc/fstab mounts X there)")
    writers = [
        lambda: boot.plan_set_default(f, f"{OLD}+1"),
        lambda: boot.plan_next(f, f"{OLD}+1"),
        lambda: boot.plan_menu_timeout(f, 5),
        lambda: rollback.plan_rollback(f, [], f"{OLD}+1"),
        lambda: rollback.plan_rollback(replace(f, entries={}), [], None),
        lambda: layers.plan_layer_add(f, None, "LABEL=boot /boot ext4 defaults 0 2\n"),
        lambda: layers.plan_layer_remove(f, f"{OLD}+1"),
        lambda: layers.plan_base_remove(f, OLD),
    ]
    for writer in writers:
        with pytest.raises(InputError, match="/boot is not mounted"):
            writer()
    # an unmounted /boot shows no entries: the refusal names /boot, not a missing entry
    for plan in (boot.plan_set_default, boot.plan_next):
        with pytest.raises(InputError, match="/boot is not mounted"):
            plan(replace(f, entries={}), f"{OLD}+1")
    monkeypatch.setattr(NodeFacts, "gather", classmethod(lambda cls: f))
    with pytest.raises(InputError, match="/boot is not mounted"):
        update.gather_facts(Verified(Path("/nonexistent.squashfs"), "n-2.0-1", None,
                                     "missing (--insecure)", copy=False),
                            allow_downgrade=False, tries=3)


def test_boot_unmounted_reads_fstab() -> None:
    fstab = "# /boot was on /dev/sda1\nUUID=1 /boot/ ext4 defaults 0 2\n"
    assert boot_unmounted(fstab, Path("/boot"), False) == (
        "/boot is not mounted (/etc/fstab mounts UUID=1 there)")
    assert boot_unmounted(fstab, Path("/boot"), True) is None
    assert boot_unmounted("UUID=2 /boot/efi vfat defaults 0 2\n", Path("/boot"), False) is None
