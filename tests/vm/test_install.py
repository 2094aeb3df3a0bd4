"""`imgbase install` onto a blank disk in a live guest, then the disk boots on its own.

Real LVM thin pool, real grub, real boot: all inside qemu guests.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest

from imgbase.vm import Guest, VmSpec
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.vm]

NVR = "imgbase-node-1.0-1"


@pytest.fixture(scope="module")
def installed_disk(node_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("install")
    disk = work / "node.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "20G"], check=True)
    with Guest(VmSpec(live=node_image, attach=(disk,)), rundir=work / "installer") as guest:
        not_yet = guest.run("imgbase status --json", check=False)
        assert not_yet.rc == 2 and "this is not an imgbase node" in not_yet.stderr
        dry = guest.run("imgbase install --disk /dev/vdb --dry-run --json").stdout
        assert [s["name"] for s in json.loads(dry)][:2] == ["wipe", "partition"]
        guest.run("imgbase install --disk /dev/vdb --json", timeout=1200)
        again = guest.run("imgbase install --disk /dev/vdb", check=False)
        assert again.rc == 2 and "holds LVM physical volumes" in again.stderr
    return disk


def same_device(host, a: str, b: str) -> bool:  # type: ignore[no-untyped-def]
    """/dev/VG/LV and /dev/mapper/VG-LV name the same device-mapper node."""
    real_a, real_b = (host.check_output(f"readlink -f '{p}'") for p in (a, b))
    return bool(real_a.startswith("/dev/dm-") and real_a == real_b)


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
    assert [v["name"] for v in status["volumes"]] == ["var"]
    assert host.check_output("imgbase w") == f"{NVR}+1"
