"""One disk, three firmware paths: the nist disk that test_install boots under BIOS boots
under UEFI with Secure Boot through its NVRAM entry (shim -> signed grub -> signed kernel),
and under plain UEFI with its NVRAM reset, through the removable-media path.

The disk was installed by a live guest running under Secure Boot (tests/vm/prepare.py),
whose NVRAM the disk keeps, as a server's would. Real ESP, real OVMF, real boots.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from imgbase.vm import Guest
from tests.vm.nodes import NVR, same_device

pytestmark = [pytest.mark.slow, pytest.mark.vm]


def esp_and_check(host) -> None:  # type: ignore[no-untyped-def]
    """/ is the layer, /boot/efi the disk's FAT ESP, and imgbase check passes, its ESP
    check included (shim and grub on the ESP are the booted image's)."""
    mounts = {fs["target"]: fs for fs in json.loads(host.check_output(
        "findmnt -J -l -o TARGET,SOURCE,FSTYPE"))["filesystems"]}
    assert same_device(host, mounts["/"]["source"], f"/dev/node2/{NVR}+1")
    assert mounts["/boot/efi"]["fstype"] == "vfat"
    assert host.check_output(f"lsblk -n -o PARTTYPE {mounts['/boot/efi']['source']}") \
        == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"  # the ESP's GPT type
    check = json.loads(host.check_output("imgbase check --json"))
    assert check["ok"] is True, [c for c in check["checks"] if not c["ok"]]
    [esp] = [c for c in check["checks"] if c["name"] == "esp"]
    assert "booted image's" in esp["detail"]


def test_secure_boot_through_the_nvram_entry(installed_disks: dict[str, Path],
                                             boot: Callable[..., Guest]) -> None:
    host = boot(disk=installed_disks["nist"], firmware="secureboot").host()
    assert host.check_output("mokutil --sb-state") == "SecureBoot enabled"
    assert "Secure boot enabled" in host.check_output("dmesg | grep secureboot:")
    entries = host.check_output("efibootmgr")
    current = re.search(r"^BootCurrent: (\w+)$", entries, re.M)
    assert current, entries
    assert re.search(rf"^Boot{current.group(1)}\* imgbase\b", entries, re.M), entries
    esp_and_check(host)
    assert host.check_output("systemctl is-system-running --wait") == "running"


def test_nvram_reset_boots_the_removable_path(installed_disks: dict[str, Path],
                                              boot: Callable[..., Guest]) -> None:
    """Plain UEFI and an NVRAM of its own, without the entry: firmware finds
    \\EFI\\BOOT\\BOOTX64.EFI on the ESP, and the same menu boots the same layer."""
    host = boot(disk=installed_disks["nist"], firmware="uefi").host()
    assert host.check_output("cat /sys/firmware/efi/fw_platform_size") == "64"
    assert host.check_output("mokutil --sb-state").startswith("SecureBoot disabled")
    assert "Secure boot disabled" in host.check_output("dmesg | grep secureboot:")
    entries = host.check_output("efibootmgr")
    assert not re.search(r"^Boot\w+\* imgbase\b", entries, re.M), entries
    esp_and_check(host)
