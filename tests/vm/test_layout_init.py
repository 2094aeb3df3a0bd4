"""`imgbase layout --init` adopts what anaconda leaves (autopart --type=thinp + liveimg),
run as the kickstart's %post does: chrooted into the target. The adopted disk boots.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from imgbase.vm import Guest, VmSpec
from tests.vm.nodes import NVR, same_device

pytestmark = [pytest.mark.slow, pytest.mark.vm]

SCRIPT = Path(__file__).with_name("anaconda_like.sh")


@pytest.fixture(scope="module")
def adopted_disk(node_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("adopt")
    disk = work / "anaconda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "20G"], check=True)
    with Guest(VmSpec(live=node_image, attach=(disk,)), rundir=work / "live") as guest:
        guest.run(f"cat > /tmp/anaconda_like.sh <<'EOF'\n{SCRIPT.read_text()}EOF\n")
        guest.run("sh /tmp/anaconda_like.sh /dev/vdb anaconda", timeout=900)
        chroot = "chroot /mnt/sysimage"
        bad = guest.run(f"{chroot} imgbase layout --init --nvr nope", check=False)
        assert bad.rc == 2 and "'nope' is not a name-version-release" in bad.stderr
        not_lvm = guest.run("imgbase layout --init --from /run/imgbase/live/lower",
                            check=False)  # the squashfs: not an LV
        assert not_lvm.rc == 2 and "not an LVM logical volume" in not_lvm.stderr
        plan = json.loads(guest.run(f"{chroot} imgbase layout --init --dry-run --json").stdout)
        assert plan["operation"] == "layout-init" and plan["steps"][-1]["name"] == "tag-vg"
        assert guest.run("vgs --noheadings -o vg_tags anaconda").stdout.strip() == ""
        # a first attempt cut short leaves LVs; running it again removes them and goes on
        cut = guest.run(f"IMGBASE_CRASH_AFTER_STEP=layer-create {chroot} imgbase layout --init",
                        check=False)
        assert cut.rc == 137
        guest.run(f"{chroot} imgbase layout --init", timeout=900)
        again = guest.run(f"{chroot} imgbase layout --init", check=False)
        assert again.rc == 2 and "already on an imgbase node" in again.stderr
        guest.run("umount -R -l /mnt/sysimage && sync")
    return disk


def test_adopted_install_boots_from_its_layer(adopted_disk: Path,
                                              boot: Callable[..., Guest]) -> None:
    guest = boot(disk=adopted_disk)
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
    # anaconda's fstab lines other than / are kept (its /boot by UUID)
    fstab = host.file("/etc/fstab").content_string
    assert "UUID=" in fstab and " /boot " in fstab and "anaconda-root" not in fstab
    host.run_expect([0], "imgbase recover")
    status = json.loads(host.check_output("imgbase status --json"))
    assert status["retired"] == [] and host.run("lvs anaconda/root").rc != 0
    assert json.loads(host.check_output("imgbase check --json"))["ok"] is True
