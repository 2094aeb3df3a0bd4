"""`imgbase install --volumes nist` over a disk that held an active VG, then the disk boots.

The minimal install boots in test_node, whose guest is that node.

Real LVM thin pool, real grub, real boot: all inside qemu guests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from imgbase.vm import Guest
from tests.vm.nodes import NVR, same_device

pytestmark = [pytest.mark.slow, pytest.mark.vm]

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
