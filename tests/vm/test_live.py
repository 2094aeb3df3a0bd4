"""The node image booted live in qemu (TCG): the acceptance of `imgbase vm`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import imgbase
from imgbase.vm import Guest
from tests.conftest import imgbase_cli

pytestmark = [pytest.mark.slow, pytest.mark.vm]


IDENTITY = "cat /etc/machine-id; ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub"
CLI_RUN: dict[str, str] = {}  # the identity the --run boot printed, for the identity test


def test_cli_run_passes_output_and_exit_status_through(node_image: Path) -> None:
    # one boot for three: the system comes up running; stdout, stderr and the status of
    # the command come back separately; and the boot's identity, for a test below
    proc = imgbase_cli("vm", "--live", str(node_image), "--run",
                       f"systemctl is-system-running --wait; {IDENTITY}; echo err >&2; exit 7",
                       timeout=900)
    lines = proc.stdout.splitlines()
    assert (proc.returncode, lines[0], proc.stderr) == (7, "running", "err\n")
    CLI_RUN["identity"] = "\n".join(lines[1:])


def test_root_is_an_overlay_over_the_squashfs(live_guest: Guest) -> None:
    host = live_guest.host()
    root = json.loads(host.check_output("findmnt -J -o FSTYPE,OPTIONS /"))["filesystems"][0]
    assert root["fstype"] == "overlay"
    assert "lowerdir=/run/imgbase/live/lower" in root["options"]
    lower = json.loads(host.check_output("findmnt -J -o SOURCE,FSTYPE /run/imgbase/live/lower"))
    assert lower["filesystems"][0] == {"source": "/dev/vda", "fstype": "squashfs"}
    assert host.file("/etc/imgbase-written").exists is False
    host.run_expect([0], "touch /etc/imgbase-written")  # writable, in RAM


def test_libvirt_offers_qemu_domains(live_guest: Guest) -> None:
    host = live_guest.host()
    caps = host.check_output("virsh -c qemu:///system capabilities")
    assert "<domain type='qemu'" in caps
    assert "<domain type='kvm'" not in caps  # TCG guest: no nested virtualization offered
    assert host.service("libvirtd").is_running


def test_imgbase_in_guest_equals_host(live_guest: Guest) -> None:
    assert live_guest.run("imgbase --version").stdout.strip() == f"imgbase {imgbase.__version__}"
    nvr = json.loads(live_guest.run("cat /usr/lib/imgbase/image.json").stdout)["nvr"]
    assert nvr == "imgbase-node-1.0-1"


def test_blank_and_attached_disks(live_guest: Guest) -> None:
    disks = json.loads(live_guest.run("lsblk -J -b -d -o NAME,SIZE").stdout)["blockdevices"]
    sizes = {d["name"]: int(d["size"]) for d in disks}
    assert sizes["vdb"] == 1 << 30 and sizes["vdc"] == 64 << 20


def _identity(text: str) -> tuple[str, str]:
    out = text.splitlines()
    assert re.fullmatch(r"[0-9a-f]{32}", out[0]), out
    return out[0], out[1].split()[1]


def test_each_boot_makes_its_own_identity(live_guest: Guest) -> None:
    """Two boots of one image -- this module's guest and the --run boot above -- have their
    own machine-id and SSH host key (the image ships neither)."""
    if "identity" not in CLI_RUN:
        pytest.skip("needs the --run boot of test_cli_run_passes_output_and_exit_status_through")
    first = _identity(live_guest.run(IDENTITY).stdout)
    second = _identity(CLI_RUN["identity"])
    assert first[0] != second[0], "machine-id repeated across boots"
    assert first[1] != second[1], "SSH host key repeated across boots"


def test_selfcheck_passes(node_image: Path) -> None:
    proc = imgbase_cli("vm", "--live", str(node_image), "--selfcheck", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "IMGBASE-SELFCHECK libvirt ok" in proc.stdout
    assert "IMGBASE-SELFCHECK-RESULT pass" in proc.stdout


def test_selfcheck_fails_when_a_check_fails(node_image: Path) -> None:
    proc = imgbase_cli("vm", "--live", str(node_image), "--selfcheck",
                       "--append", "systemd.mask=libvirtd.service", timeout=900)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # 3 would be "no result"
    assert "IMGBASE-SELFCHECK libvirt FAIL" in proc.stdout
    assert "IMGBASE-SELFCHECK-RESULT fail" in proc.stdout
