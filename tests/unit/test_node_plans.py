"""The node's planners and checks are pure: synthetic facts in, plans and verdicts out."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from imgbase import bootloader
from imgbase.bootloader.grub import parse_entries
from imgbase.config import CheckSettings, load
from imgbase.errors import InputError
from imgbase.node import check, layers, recover
from imgbase.node.adopt import AdoptFacts, plan_adopt
from imgbase.node.facts import NodeFacts
from imgbase.storage.layout import NodeLayout
from imgbase.storage.lvm import LogicalVolume

NVR = "n-1.0-1"


def lv(name: str, attr: str = "Vwi-aotz--", origin: str = "", tags: str = "",
       data: float | None = None, meta: float | None = None) -> LogicalVolume:
    return LogicalVolume(name, "vg", attr, 1 << 30, "" if attr[0] == "t" else "pool", origin,
                         frozenset(t for t in tags.split(",") if t), data, meta)


POOL = lv("pool", "twi-aotz--", tags="imgbase:pool", data=10.0, meta=5.0)
BASE = lv(NVR, "Vri---tz-k", tags="imgbase:base")
LAYER1 = lv(f"{NVR}+1", origin=NVR, tags="imgbase:layer")
VAR = lv("var", tags="imgbase:volume,imgbase:mount=/var")


def node(*extra: LogicalVolume, booted: str | None = f"{NVR}+1",
         entries: tuple[str, ...] = (f"{NVR}+1",)) -> NodeFacts:
    layout = NodeLayout("vg", (POOL, BASE, LAYER1, VAR, *extra), 0)
    return NodeFacts(layout, booted, {"saved_entry": f"{NVR}+1"},
                     {e: bootloader.entry(Path("/boot"), e, f"/dev/vg/{e}", "rw quiet")
                      for e in entries},
                     Path("/boot"))


def names(plan) -> list[str]:  # type: ignore[no-untyped-def]
    return [s.name for s in plan.steps]


def test_layer_add_names_the_next_layer_and_writes_its_fstab_from_volume_tags() -> None:
    f = node(lv(f"{NVR}+3", origin=NVR, tags="imgbase:layer"), entries=(f"{NVR}+1", f"{NVR}+3"))
    plan = layers.plan_layer_add(f, None, "LABEL=boot /boot ext4 defaults 0 2\n")
    create = plan.steps[0].argv
    assert f"{NVR}+4" in create and f"vg/{NVR}" == create[-1]
    fstab = next(s for s in plan.steps if s.name == "layer-fstab").write
    assert fstab is not None
    assert fstab[1].splitlines() == [f"/dev/vg/{NVR}+4 / ext4 defaults,discard 0 1",
                                     "LABEL=boot /boot ext4 defaults 0 2",
                                     "/dev/vg/var /var ext4 defaults,discard 0 2"]
    entries = next(s for s in plan.steps if s.name == "boot-entries").write
    assert entries is not None and f"root=/dev/vg/{NVR}+4 rw quiet" in entries[1]
    assert list(parse_entries(entries[1])) == [f"{NVR}+4", f"{NVR}+3", f"{NVR}+1"]
    assert names(plan)[-2:] == ["layer-complete", "boot-commit"]
    assert "boot-default" not in names(plan)


@pytest.mark.parametrize(("remove", "message"), [
    (f"{NVR}+1", "is booted"),
    ("x-1-1+1", "is not a layer of this node"),
    ("nolayer", "is not a layer name"),
])
def test_layer_remove_refuses(remove: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        layers.plan_layer_remove(node(), remove)


def test_layer_remove_refuses_the_default_even_if_not_booted() -> None:
    with pytest.raises(InputError, match="is the default boot entry"):
        layers.plan_layer_remove(node(booted=None), f"{NVR}+1")


def test_base_remove_drops_entries_then_layers_then_the_base() -> None:
    other = lv("m-2.0-1", "Vri---tz-k", tags="imgbase:base")
    layer = lv("m-2.0-1+1", origin="m-2.0-1", tags="imgbase:layer")
    plan = layers.plan_base_remove(node(other, layer, entries=(f"{NVR}+1", "m-2.0-1+1")),
                                  "m-2.0-1")
    assert names(plan) == ["boot-entries", "boot-fallback", "boot-files", "remove-m-2.0-1+1",
                           "remove-base", "boot-commit"]
    with pytest.raises(InputError, match=f"cannot remove base {NVR}: layer {NVR}\\+1 is booted"):
        layers.plan_base_remove(node(), NVR)


def test_a_base_keeps_its_rescue_entry_until_it_is_removed() -> None:
    other = lv("m-2.0-1", "Vri---tz-k", tags="imgbase:base")
    layer = lv("m-2.0-1+1", origin="m-2.0-1", tags="imgbase:layer")
    f = replace(node(other, layer, entries=(f"{NVR}+1", "m-2.0-1+1")),
                rescue=(NVR, "m-2.0-1"), boot_uuid="0b00", rescue_menu=True,
                base_dirs=(NVR, "m-2.0-1"))
    plan = layers.plan_base_remove(f, "m-2.0-1")
    assert names(plan)[:2] == ["boot-rescue", "rescue-remove-m-2.0-1"]
    menu = plan.steps[0].write
    assert menu is not None and menu[0] == "/boot/grub/imgbase-rescue.cfg"
    assert list(parse_entries(menu[1])) == [f"rescue-{NVR}"]
    assert (f"root=/dev/vg/{NVR} ro imgbase.rescue imgbase.live systemd.unit=rescue.target"
            in menu[1]) and "imgbase.boot=0b00" in menu[1]
    assert plan.steps[1].argv[-1] == "/boot/m-2.0-1"


def test_a_half_copied_rescue_kernel_goes_with_its_base() -> None:
    """Files of a base that never made it into the menu (a cut, a full /boot): removed with
    the base all the same; and recover removes those whose base is gone already."""
    other = lv("m-2.0-1", "Vri---tz-k", tags="imgbase:base")
    f = replace(node(other), rescue=(NVR,), rescue_menu=True, base_dirs=(NVR, "m-2.0-1"))
    assert names(layers.plan_base_remove(f, "m-2.0-1"))[:2] == ["rescue-remove-m-2.0-1",
                                                                 "remove-base"]
    orphan = replace(node(), rescue=(NVR,), rescue_menu=True, base_dirs=(NVR, "gone-1-1"))
    assert "rescue-remove-gone-1-1" in names(recover.plan_recover(orphan, [], []))


def test_a_base_booted_next_by_its_rescue_entry_or_running_it_is_kept() -> None:
    from imgbase.node import gc

    other = lv("m-0.9-1", "Vri---tz-k", tags="imgbase:base")
    f = replace(node(other), rescue=(NVR, "m-0.9-1"), rescue_menu=True,
                base_dirs=(NVR, "m-0.9-1"))
    assert "remove-m-0.9-1" in names(gc.plan_gc(f, keep=1))
    f_next = replace(f, env={**f.env, "next_entry": "rescue-m-0.9-1"})
    assert "remove-m-0.9-1" not in names(gc.plan_gc(f_next, keep=1))
    in_rescue = replace(f, booted=None, rescued="m-0.9-1")
    assert "remove-m-0.9-1" not in names(gc.plan_gc(in_rescue, keep=1))
    with pytest.raises(InputError, match="the rescue system runs from it"):
        layers.plan_base_remove(in_rescue, "m-0.9-1")


def test_no_rescue_entry_where_grub_reads_no_rescue_menu() -> None:
    """A grub.cfg older than rescue entries (or a BLS /boot): no kernel copied for a menu
    GRUB never reads, and boot --rescue says why."""
    from imgbase.node import boot

    plan = layers.plan_layer_add(node(), None, "")
    assert "rescue-files" not in names(plan) and "boot-rescue" not in names(plan)
    with pytest.raises(InputError, match="reads no rescue menu"):
        boot.plan_rescue(node(), NVR)


def test_a_layer_of_a_base_without_rescue_entry_gives_it_one() -> None:
    f = replace(node(), rescue_menu=True)
    plan = layers.plan_layer_add(f, None, "LABEL=boot /boot ext4 defaults 0 2\n")
    files = next(s for s in plan.steps if s.name == "rescue-files")
    assert files.argv[-1] == f"/boot/{NVR}"
    menu = next(s for s in plan.steps if s.name == "boot-rescue").write
    assert menu is not None and list(parse_entries(menu[1])) == [f"rescue-{NVR}"]
    assert "rescue-files" not in names(layers.plan_layer_add(replace(f, rescue=(NVR,)), None,
                                                             ""))


def test_boot_rescue_sets_the_next_boot_to_the_rescue_entry() -> None:
    from imgbase.node import boot

    f = replace(node(), rescue=(NVR,), rescue_menu=True)
    plan = boot.plan_rescue(f, None)
    env = plan.steps[0].write
    assert env is not None and f"next_entry=rescue-{NVR}" in env[1]
    with pytest.raises(InputError, match="has no rescue entry"):
        boot.plan_rescue(replace(node(), rescue_menu=True), NVR)
    with pytest.raises(InputError, match="is not a base of this node"):
        boot.plan_rescue(f, f"{NVR}+1")


def test_recover_removes_leftovers_but_never_the_booted_layer_or_its_base() -> None:
    f = node(lv(f"{NVR}+2", origin=NVR, tags="imgbase:layer,imgbase:incomplete"),
             lv(f"{NVR}+3", origin=NVR, tags="imgbase:layer"),  # no boot entry
             lv("old", "Vwi-a-tz--", tags="imgbase:retired"),
             lv("busy", "Vwi-aotz--", tags="imgbase:retired"),  # open: kept
             entries=(f"{NVR}+1", f"{NVR}+9"))  # +9: an entry without a layer
    f = replace(f, layout=replace(f.layout, lvs=(*f.layout.lvs, replace(
        BASE, tags=frozenset({"imgbase:base", "imgbase:incomplete"})))))
    plan = recover.plan_recover(f, ["/run/imgbase/work/layer-add"],
                                [{"event": "begin", "operation": "layer-add"}])
    argvs = [" ".join(s.argv) for s in plan.steps]
    assert argvs[0] == "umount -l /run/imgbase/work/layer-add"
    removed = [a.split("/")[-1] for a in argvs if a.startswith("lvremove")]
    assert removed == [f"{NVR}+2", f"{NVR}+3", "old"]
    assert "boot-entries" in names(plan) and names(plan)[-1] == "clear-journal"
    entries = next(s for s in plan.steps if s.name == "boot-entries").write
    assert entries is not None and list(parse_entries(entries[1])) == [f"{NVR}+1"]


def test_recover_finishes_an_update_cut_short_before_its_default_switch() -> None:
    from imgbase.bootloader import grubenv

    new = "n-2.0-1+1"
    f = node(lv("n-2.0-1", "Vri---tz-k", tags="imgbase:base"),
             lv(new, origin="n-2.0-1", tags="imgbase:layer"), entries=(f"{NVR}+1", new))
    steps = ["layer-complete", "boot-default"]
    journal = [{"event": "begin", "operation": "update", "steps": steps, "layer": new,
                "tries": "2"}, {"event": "start", "step": "layer-complete"},
               {"event": "done", "step": "layer-complete"}]
    plan = recover.plan_recover(f, [], journal)
    assert names(plan) == ["finish-update-default", "boot-commit", "clear-journal"]
    env = grubenv.parse(plan.steps[0].write[1])  # type: ignore[index]
    assert env == {"saved_entry": new, "imgbase_tries": "2", "imgbase_fallback": f"{NVR}+1"}
    # not complete yet: undone, never finished
    incomplete = node(lv("n-2.0-1", "Vri---tz-k", tags="imgbase:base"),
                      lv(new, origin="n-2.0-1", tags="imgbase:layer,imgbase:incomplete"),
                      entries=(f"{NVR}+1", new))
    plan = recover.plan_recover(incomplete, [], [{**journal[0], "base": "n-2.0-1"}, journal[1]])
    assert "finish-update-default" not in names(plan)
    removals = [n for n in names(plan) if n.startswith("remove-")]
    assert removals == [f"remove-{new}", "remove-n-2.0-1"]  # the layer, then its base
    # the update had given the base its rescue entry: the menu drops it before the base goes
    plan = recover.plan_recover(replace(incomplete, rescue=(NVR, "n-2.0-1"), rescue_menu=True,
                                        base_dirs=(NVR, "n-2.0-1")), [],
                                [{**journal[0], "base": "n-2.0-1"}, journal[1]])
    at = names(plan).index
    assert at("boot-rescue") < at("rescue-remove-n-2.0-1") < at("remove-n-2.0-1")
    menu = next(s for s in plan.steps if s.name == "boot-rescue").write
    assert menu is not None and list(parse_entries(menu[1])) == [f"rescue-{NVR}"]


def test_recover_removes_boot_files_of_a_layer_that_never_got_its_entry() -> None:
    plan = recover.plan_recover(node(), [], [], boot_dirs=(f"{NVR}+1", "n-2.0-1+1"))
    assert names(plan) == ["boot-files-n-2.0-1+1", "boot-commit"]
    assert plan.steps[0].argv[-1] == "/boot/n-2.0-1+1"


def test_recover_removes_the_boot_files_of_a_layer_it_removes() -> None:
    """An update that failed copying the kernel to a full /boot: the incomplete layer goes,
    and so does its half-copied /boot directory (the power-cut campaign's full-/boot row)."""
    new = f"{NVR}+2"
    f = node(lv(new, origin=NVR, tags="imgbase:layer,imgbase:incomplete"))
    plan = recover.plan_recover(f, [], [], boot_dirs=(f"{NVR}+1", new))
    assert f"boot-files-{new}" in names(plan) and f"remove-{new}" in names(plan)


def test_recover_on_a_clean_node_plans_nothing() -> None:
    assert recover.plan_recover(node(), [], []).steps == ()


ADOPT = AdoptFacts(root="/", vg="rhel", pool="pool00", root_lv="root", nvr=NVR,
                   kernel="6.1", fstab="/dev/mapper/rhel-root / xfs defaults 0 0\n")


def test_adopt_tags_the_vg_last_and_removes_leftovers_first() -> None:
    plan = plan_adopt(replace(ADOPT, leftovers=(f"{NVR}+1", NVR)))
    n = names(plan)
    assert n[:2] == [f"leftover-{NVR}+1", f"leftover-{NVR}"] and n[-1] == "tag-vg"
    assert n.index("base-snapshot") < n.index("volume-var") < n.index("layer-create")
    assert plan.steps[n.index("base-snapshot")].argv[-1] == "rhel/root"
    assert "rhel/pool00" in plan.steps[n.index("volume-var")].argv
    fstab = plan.steps[n.index("layer-fstab")].write
    assert fstab is not None and "rhel-root" not in fstab[1]
    assert "/dev/rhel/var /var ext4 defaults,discard 0 2" in fstab[1]


def test_adopt_keeps_an_existing_var_volume() -> None:
    n = names(plan_adopt(replace(ADOPT, var_lv="home_var")))
    assert "tag-var" in n and "volume-var" not in n


def test_adopt_finds_boot_by_uuid_when_given() -> None:
    plan = plan_adopt(replace(ADOPT, boot_uuid="ab-cd"))
    cfg = next(s for s in plan.steps if s.name == "grub-cfg").write
    assert cfg is not None and "search --no-floppy --fs-uuid --set=root ab-cd" in cfg[1]


GOOD = check.CheckFacts(
    tagged_vgs=("vg",), layout=node().layout, entries=node().entries,
    boot_files=frozenset({f"{NVR}+1"}), booted=f"{NVR}+1",
    mounts={"/": check.Mount("/dev/dm-3", ("rw", "discard")),
            "/var": check.Mount("/dev/dm-4", ("rw", "discard"))},
    lv_devices={"/dev/dm-3": f"{NVR}+1", "/dev/dm-4": "var"}, autoextend=(70, 20),
    monitored=True)


def failed(f: check.CheckFacts) -> set[str]:
    return {r.name for r in check.run_checks(f) if not r.ok}


def test_a_good_node_passes_every_check() -> None:
    assert failed(GOOD) == set()


@pytest.mark.parametrize(("change", "fails"), [
    ({"tagged_vgs": ("a", "b")}, "vg"),
    ({"layout": replace(GOOD.layout, lvs=(BASE, LAYER1, VAR))}, "pool"),
    ({"layout": replace(GOOD.layout, lvs=(POOL, replace(BASE, attr="Vwi---tz-k"), LAYER1,
                                          VAR))}, "bases"),
    ({"layout": replace(GOOD.layout, lvs=(*GOOD.layout.lvs, lv("x", tags="imgbase:layer")))},
     "layers"),
    ({"limits": CheckSettings(pool_data_max=10)}, "pool-data"),
    ({"limits": CheckSettings(pool_metadata_max=4)}, "pool-metadata"),
    ({"autoextend": (100, 20)}, "autoextend"),
    ({"monitored": False}, "autoextend"),
    ({"mounts": {"/": GOOD.mounts["/"], "/var": check.Mount("tmpfs", ("rw",))}}, "var"),
    ({"mounts": {**GOOD.mounts, "/": check.Mount("/dev/dm-3", ("rw",))}}, "discard"),
    ({"boot_files": frozenset()}, "boot-entries"),
    ({"entries_junk": "menuentry broken {"}, "boot-entries"),
    ({"booted": None}, "booted"),
    ({"layout": replace(GOOD.layout, lvs=(POOL, BASE, LAYER1, replace(
        VAR, tags=VAR.tags | {"imgbase:incomplete"})))}, "incomplete"),
])
def test_each_check_fails_on_its_fault(change: dict[str, object], fails: str) -> None:
    assert fails in failed(replace(GOOD, **change))  # type: ignore[arg-type]


def test_limits_come_from_the_config_then_the_command_line(tmp_path: Path) -> None:
    conf = tmp_path / "imgbase.toml"
    conf.write_text("[check]\npool_data_max = 60\n")
    assert load(conf).check == CheckSettings(60.0, 80.0)
    assert check.limits(load(conf).check, pool_data_max=70.0) == CheckSettings(70.0, 80.0)
    conf.write_text("[check]\npool_data_mx = 60\n")
    with pytest.raises(InputError,
                       match=r"imgbase.toml:2: unknown key 'pool_data_mx' in \[check\]"):
        load(conf)
    conf.write_text("[chek]\npool_data_max = 60\n")
    with pytest.raises(InputError, match=r"imgbase.toml:1: unknown section \[chek\]"):
        load(conf)


def test_layer_add_stops_before_the_entries_when_the_layer_has_no_kernel(
        tmp_path: Path) -> None:
    import subprocess

    plan = layers.plan_layer_add(node(), None, "")
    files = next(s for s in plan.steps if s.name == "boot-files")
    tree, boot = tmp_path / "layer", tmp_path / "boot"
    (tree / "boot").mkdir(parents=True)
    argv = [*files.argv[:4], str(tree), str(boot / "x")]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 1 and "no kernel and initrd" in proc.stderr
    (tree / "boot/vmlinuz-6.1.0-9").write_text("k9")
    (tree / "boot/vmlinuz-6.1.0-10").write_text("k10")
    (tree / "boot/initrd.img-6.1.0-10").write_text("i10")
    subprocess.run(argv, check=True)
    assert (boot / "x/vmlinuz").read_text() == "k10" and (boot / "x/initrd.img").exists()
    names = [s.name for s in plan.steps]
    assert names.index("boot-files") < names.index("boot-entries")


def test_a_full_boot_is_refused_with_the_sizes(tmp_path: Path) -> None:
    (tmp_path / "a+1").mkdir()
    st = os.statvfs(tmp_path)
    with open(tmp_path / "a+1/initrd.img", "wb") as f:  # sparse, larger than the free space
        f.truncate(st.f_bavail * st.f_frsize + (1 << 30))
    with pytest.raises(InputError, match=r"/boot is too full for another layer: \d+ MiB free"):
        layers.check_boot_space(tmp_path, "a+1")
    layers.check_boot_space(tmp_path, None)


def test_a_bad_argument_in_the_model_entry_is_refused_with_its_repair() -> None:
    """layer --add (and update) take the booted layer's arguments over: one a new entry
    cannot hold is named, with the kargs --delete that repairs it."""
    f = node()
    booted = f"{NVR}+1"
    bad = replace(f, entries={booted: f.entries[booted].replace("rw quiet", "rw quiet x}")})
    with pytest.raises(InputError, match=r"the boot entry of .*\+1 has the kernel argument "
                       r"'x}'") as e:
        layers.plan_layer_add(bad, None, "LABEL=boot /boot ext4 defaults 0 2\n")
    assert f"imgbase kargs --layer {booted} --delete 'x}}'" in (e.value.hint or "")
