"""`imgbase install` onto a blank disk in a live guest, then the disk boots on its own.

Real LVM thin pool, real grub, real boot: all inside qemu guests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest

from imgbase.vm import Guest
from tests.conftest import ROOT
from tests.vm.nodes import NVR, same_device

pytestmark = [pytest.mark.slow, pytest.mark.vm]

@pytest.fixture(scope="module")
def installed_disk(installed_disks: dict[str, Path]) -> Path:
    return installed_disks["minimal"]


def test_disk_boots_from_the_layer(installed_disk: Path, boot: Callable[..., Guest]) -> None:
    guest = boot(disk=installed_disk)
    host = guest.host()
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


NIST = {"/var": "var", "/var/log": "var_log", "/var/log/audit": "var_log_audit",
        "/var/crash": "var_crash", "/var/tmp": "var_tmp", "/home": "home", "/tmp": "tmp"}


def test_nist_profile_over_a_wiped_disk(installed_disks: dict[str, Path],
                                        boot: Callable[..., Guest]) -> None:
    host = boot(disk=installed_disks["nist"]).host()
    assert host.check_output("systemctl is-system-running --wait") == "running"
    mounts = {fs["target"]: fs for fs in json.loads(host.check_output(
        "findmnt -J -l -o TARGET,SOURCE,OPTIONS"))["filesystems"]}
    for mountpoint, lv in NIST.items():
        assert same_device(host, mounts[mountpoint]["source"], f"/dev/node2/{lv}"), mountpoint
        assert "discard" in mounts[mountpoint]["options"].split(","), mountpoint
    assert host.file("/tmp").mode == 0o1777 and host.file("/var/tmp").mode == 0o1777
    assert same_device(host, mounts["/"]["source"], f"/dev/node2/{NVR}+1")
    status = json.loads(host.check_output("imgbase status --json"))
    assert status["vg"] == "node2"
    assert {v["mountpoint"]: v["name"] for v in status["volumes"]} == NIST
    check = json.loads(host.check_output("imgbase check --json"))
    assert check["ok"] is True, [c for c in check["checks"] if not c["ok"]]
