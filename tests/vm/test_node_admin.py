"""The node `imgbase install` made on a blank disk, booted from that disk: it runs from
its layer with the base read-only and /var apart, every `imgbase check` can fail, the booted
layer cannot be removed, and an interrupted operation is cleaned up by `recover`.

One guest boots the installed disk through a throw-away overlay; each check test
breaks one thing, asserts that exactly that check fails, and puts it back. (A new layer
booting is in test_lifecycle.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from imgbase.vm import Guest
from tests.conftest import ROOT
from tests.vm.nodes import NVR, module_node, same_device

pytestmark = [pytest.mark.slow, pytest.mark.vm]

LAYER = f"{NVR}+1"
ENTRIES = "/boot/grub/imgbase-entries.cfg"


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest, installed_disks: dict[str, Path],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    yield from module_node(request, installed_disks["minimal"],
                           tmp_path_factory.mktemp("node") / "run")


def check(guest: Guest) -> dict[str, dict[str, object]]:
    proc = guest.run("imgbase check --json", check=False)
    report = json.loads(proc.stdout)
    assert proc.rc == (0 if report["ok"] else 1)
    return {c["name"]: c for c in report["checks"]}


# (check, how to break it, how to put it back, other checks that fail along with it)
BREAKS = [
    ("vg", "vgchange --deltag imgbase:vg imgbase", "vgchange --addtag imgbase:vg imgbase",
     {"pool", "bases", "layers", "pool-data", "pool-metadata", "autoextend", "var", "booted"}),
    ("pool", "lvchange --deltag imgbase:pool imgbase/pool",
     "lvchange --addtag imgbase:pool imgbase/pool",
     {"pool-data", "pool-metadata", "autoextend"}),
    ("bases", f"lvchange -y --permission rw imgbase/{NVR}",
     f"lvchange -y --permission r imgbase/{NVR}", set()),
    ("layers", "lvcreate -q -y -V 1G -T imgbase/pool -n stray --addtag imgbase:layer",
     "lvremove -q -y imgbase/stray", set()),
    ("pool-data", "mkdir -p /etc/imgbase && echo '[check]\npool_data_max = 0.01' "
     "> /etc/imgbase/imgbase.toml", "rm /etc/imgbase/imgbase.toml", set()),
    ("pool-metadata", "mkdir -p /etc/imgbase && echo '[check]\npool_metadata_max = 0.01' "
     "> /etc/imgbase/imgbase.toml", "rm /etc/imgbase/imgbase.toml", set()),
    ("autoextend", "lvchange --detachprofile imgbase/pool",
     "lvchange --metadataprofile imgbase-thin imgbase/pool", set()),
    ("autoextend", "lvchange --monitor n imgbase/pool", "lvchange --monitor y imgbase/pool",
     set()),
    ("var", "mkdir -p /run/fakevar && mount --bind /run/fakevar /var", "umount /var",
     {"discard"}),  # the tmpfs now on /var has no discard either
    ("discard", "mount -o remount,nodiscard /", "mount -o remount,discard /", set()),
    ("boot-entries", f"lvcreate -q -y -s -kn -n {NVR}+7 --addtag imgbase:layer imgbase/{NVR}",
     f"lvremove -q -y imgbase/{NVR}+7", set()),
    ("boot-entries", f"cp {ENTRIES} /run/entries && printf \"menuentry 'x' --id '{NVR}+9' "
     f"{{\\n}}\\n\" >> {ENTRIES}", f"mv /run/entries {ENTRIES}", set()),
    ("boot-entries", f"mv /boot/{LAYER}/vmlinuz /run/vmlinuz",
     f"mv /run/vmlinuz /boot/{LAYER}/vmlinuz", set()),  # an entry pointing at no kernel
    ("boot-entries", f"cp {ENTRIES} /run/entries && echo 'menuentry {{ garbage' >> {ENTRIES}",
     f"mv /run/entries {ENTRIES}", set()),  # edited into nonsense: reported, not a crash
    ("booted", f"lvchange --deltag imgbase:layer imgbase/{LAYER}",
     f"lvchange --addtag imgbase:layer imgbase/{LAYER}", {"layers", "boot-entries"}),
    ("incomplete", "lvchange --addtag imgbase:incomplete imgbase/var",
     "lvchange --deltag imgbase:incomplete imgbase/var", set()),
]


def test_installed_disk_boots_from_its_layer(node: Guest) -> None:
    host = node.host()
    assert host.check_output("systemctl is-system-running --wait") == "running"
    root = json.loads(host.check_output("findmnt -J -o SOURCE,FSTYPE,OPTIONS /"))
    fs = root["filesystems"][0]
    assert same_device(host, fs["source"], f"/dev/imgbase/{NVR}+1")
    assert fs["fstype"] == "ext4" and "discard" in fs["options"]
    var = json.loads(host.check_output("findmnt -J -o SOURCE /var"))["filesystems"][0]
    assert same_device(host, var["source"], "/dev/imgbase/var")
    lvs = {lv["lv_name"]: lv for lv in json.loads(host.check_output(
        "lvs --reportformat json -o lv_name,lv_attr,lv_tags,origin,pool_lv imgbase"
    ))["report"][0]["lv"]}
    base, layer = lvs[NVR], lvs[f"{NVR}+1"]
    assert base["lv_attr"][1] == "r" and base["lv_attr"][4] != "a" and base["lv_attr"][9] == "k"
    assert "imgbase:base" in base["lv_tags"] and base["pool_lv"] == "pool"
    assert layer["origin"] == NVR and "imgbase:layer" in layer["lv_tags"]
    assert layer["lv_attr"][1] == "w" and layer["lv_attr"][4] == "a"
    assert "imgbase:volume" in lvs["var"]["lv_tags"]
    assert host.file("/var/lib/dpkg/status").exists  # package db reachable through /var
    assert host.check_output("imgbase --version").startswith("imgbase ")

    status = json.loads(host.check_output("imgbase status --json"))
    schema = json.loads((ROOT / "docs/status.schema.json").read_text())
    jsonschema.validate(status, schema)
    assert status["booted_layer"] == status["default_layer"] == f"{NVR}+1"
    assert status["bases"][0]["name"] == NVR and status["bases"][0]["read_only"] is True
    assert [(v["name"], v["mountpoint"]) for v in status["volumes"]] == [("var", "/var")]
    assert host.check_output("imgbase w") == f"{NVR}+1"
    check = json.loads(host.check_output("imgbase check --json"))
    assert check["ok"] is True, [c for c in check["checks"] if not c["ok"]]
    assert {c["name"] for c in check["checks"]} >= {
        "vg", "pool", "bases", "layers", "pool-data", "pool-metadata", "autoextend", "var",
        "discard", "boot-entries", "booted", "incomplete"}


def test_node_passes_every_check(node: Guest) -> None:
    failed = {k: v for k, v in check(node).items() if not v["ok"]}
    assert not failed


@pytest.mark.parametrize(("name", "breaks", "mends", "also"), BREAKS,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BREAKS)])
def test_each_check_can_fail(node: Guest, name: str, breaks: str, mends: str,
                             also: set[str]) -> None:
    node.run(breaks)
    try:
        results = check(node)
    finally:
        node.run(mends)
    failed = {k for k, v in results.items() if not v["ok"]}
    assert failed == {name} | also, results
    assert results[name]["detail"]
    if "vmlinuz" in breaks:
        assert f"boot entry {LAYER} has no kernel or initrd" in str(results[name]["detail"])
    if "garbage" in breaks:
        assert "not an entry" in str(results[name]["detail"])
        assert node.run("imgbase status --json", check=False).rc == 0
    # put back: the next test asserts its own check alone fails, the later ones that all pass


def test_check_refuses_a_bad_config(node: Guest) -> None:
    node.run("mkdir -p /etc/imgbase && echo '[check]\npool_data_max = 150' "
             "> /etc/imgbase/imgbase.toml")
    try:
        proc = node.run("imgbase check", check=False)
    finally:
        node.run("rm /etc/imgbase/imgbase.toml")
    assert proc.rc == 2 and "pool_data_max = 150 is not a percentage" in proc.stderr


def test_booted_layer_and_its_base_cannot_be_removed(node: Guest) -> None:
    for command, message in (
        (f"imgbase layer --remove {LAYER}", f"cannot remove {LAYER}: layer {LAYER} is booted"),
        (f"imgbase base --remove {NVR}", f"cannot remove base {NVR}: layer {LAYER} is booted"),
        ("imgbase layer --remove nope", "'nope' is not a layer name"),
        ("imgbase layer --remove nope-1-1+1", "nope-1-1+1 is not a layer of this node"),
        ("imgbase base --remove nope", "'nope' is not a name-version-release"),
    ):
        proc = node.run(command, check=False)
        assert proc.rc == 2 and message in proc.stderr, (command, proc.stderr)
    assert [la["name"] for la in json.loads(node.run("imgbase status --json").stdout)
            ["layers"]] == [LAYER]


def test_interrupted_layer_add_is_recovered(node: Guest) -> None:
    crashed = node.run("IMGBASE_CRASH_AFTER_STEP=layer-fstab imgbase layer --add", check=False)
    assert crashed.rc == 137
    status = json.loads(node.run("imgbase status --json").stdout)
    assert status["incomplete"] == [f"{NVR}+2"]
    results = check(node)
    assert not results["incomplete"]["ok"] and not results["boot-entries"]["ok"]
    dry = node.run("imgbase recover --dry-run").stdout
    assert "interrupted: layer-add, after step layer-fstab" in dry
    assert f"lvremove -y imgbase/{NVR}+2" in dry and "umount -l /run/imgbase/work/layer-add" in dry
    assert f"{NVR}+2" in node.run("lvs --noheadings -o lv_name imgbase").stdout  # dry: kept
    node.run("imgbase recover")
    status = json.loads(node.run("imgbase status --json").stdout)
    assert status["incomplete"] == [] and [la["name"] for la in status["layers"]] == [LAYER]
    assert all(v["ok"] for v in check(node).values())
    assert "no interrupted operation" in node.run("imgbase recover --dry-run").stdout
