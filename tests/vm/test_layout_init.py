"""`imgbase layout --init` adopts what anaconda leaves (autopart --type=thinp + liveimg),
run by the default kickstart's rendered %post as anaconda runs it: chrooted into the
target (in the installer session of tests/vm/prepare.py, adopt_like_anaconda). The
adopted disk boots, with what the %post wrote.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from imgbase.vm import Guest
from tests.vm.nodes import NVR, same_device
from tests.vm.prepare import KICKSTART_KARG

pytestmark = [pytest.mark.slow, pytest.mark.vm]


def test_adopted_install_boots_from_its_layer(installed_disks: dict[str, Path],
                                              boot: Callable[..., Guest]) -> None:
    guest = boot(disk=installed_disks["anaconda"])
    host = guest.host()
    assert host.check_output("systemctl is-system-running --wait") == "running"
    root = json.loads(host.check_output("findmnt -J -o SOURCE,OPTIONS /"))["filesystems"][0]
    assert same_device(host, root["source"], f"/dev/anaconda/{NVR}+1")
    assert "discard" in root["options"]
    var = json.loads(host.check_output("findmnt -J -o SOURCE /var"))["filesystems"][0]
    assert same_device(host, var["source"], "/dev/anaconda/var")
    assert host.file("/var/lib/dpkg/status").exists
    status = json.loads(host.check_output("imgbase status --json"))
    assert status["vg"] == "anaconda" and status["pool"]["name"] == "pool00"
    assert status["booted_layer"] == status["default_layer"] == f"{NVR}+1"
    base = status["bases"][0]
    assert (base["name"], base["read_only"], base["active"], base["activation_skip"]) == (
        NVR, True, False, True)
    assert [(v["name"], v["mountpoint"]) for v in status["volumes"]] == [("var", "/var")]
    assert status["retired"] == ["root"]  # anaconda's root LV, no longer booted
    check = json.loads(host.check_output("imgbase check --json"))
    assert check["ok"] is True, [c for c in check["checks"] if not c["ok"]]
    # what the rendered kickstart's %post wrote before layout --init is in the layer
    assert "kickstart-test" in host.file("/root/.ssh/authorized_keys").content_string
    assert KICKSTART_KARG in host.file("/proc/cmdline").content_string
    # anaconda's fstab lines other than / are kept (its /boot by UUID)
    fstab = host.file("/etc/fstab").content_string
    assert "UUID=" in fstab and " /boot " in fstab and "anaconda-root" not in fstab
    host.run_expect([0], "imgbase recover")
    status = json.loads(host.check_output("imgbase status --json"))
    assert status["retired"] == [] and host.run("lvs anaconda/root").rc != 0
    assert json.loads(host.check_output("imgbase check --json"))["ok"] is True
