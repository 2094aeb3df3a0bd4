"""`imgbase vm --firmware`: the node image under UEFI and under UEFI with Secure Boot
(OVMF's Secure Boot code, Microsoft's keys enrolled, as a server ships): Debian's signed
kernel from the image boots, and the guest sees the firmware it was given. Issue 20 part:
the disk's own boot under UEFI comes with shim and the signed grub."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgbase.vm import Guest, VmSpec, nvram_of
from tests.conftest import imgbase_cli

pytestmark = [pytest.mark.slow, pytest.mark.vm]

def test_uefi_and_secure_boot_boot_the_image(node_image: Path, tmp_path: Path) -> None:
    with Guest(VmSpec(live=node_image, firmware="uefi"), tmp_path / "uefi") as guest:
        assert guest.run("cat /sys/firmware/efi/fw_platform_size").stdout.strip() == "64"
        assert "secureboot: Secure boot disabled" in guest.run("dmesg").stdout
        assert (tmp_path / "uefi/uefi-vars.fd").is_file()  # a live guest's NVRAM: its run's
    with Guest(VmSpec(live=node_image, firmware="secureboot"), tmp_path / "sb") as guest:
        # enforced by the firmware: the kernel it booted is signed (the kernel says so; the
        # live image does not mount efivarfs to read the SecureBoot variable)
        assert "secureboot: Secure boot enabled" in guest.run("dmesg").stdout


def test_a_disks_nvram_is_kept_next_to_it(tmp_path: Path) -> None:
    disk = tmp_path / "node.qcow2"
    spec = VmSpec(disk=disk, firmware="secureboot")
    assert nvram_of(spec, tmp_path / "run") == tmp_path / "node.qcow2.secureboot-vars.fd"


def test_an_unknown_firmware_is_refused(node_image: Path) -> None:
    proc = imgbase_cli("vm", "--live", str(node_image), "--firmware", "coreboot")
    assert proc.returncode == 2 and "invalid choice: 'coreboot'" in proc.stderr
