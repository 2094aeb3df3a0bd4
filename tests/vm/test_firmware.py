"""`imgbase vm --firmware`: where a disk's NVRAM is kept, and a firmware that is not one.

The boots themselves are elsewhere, each on the firmware a server has: the live installer
under Secure Boot (tests/vm/prepare.py: its NVRAM file is its run's, and goes with the nist
disk), the module node's whole life under Secure Boot (test_node), the nist disk under
Secure Boot and under plain UEFI (test_uefi), BIOS (test_install, the e2e lifecycle)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgbase.vm import VmSpec, nvram_of
from tests.conftest import imgbase_cli

pytestmark = [pytest.mark.slow, pytest.mark.vm]

def test_a_disks_nvram_is_kept_next_to_it(tmp_path: Path) -> None:
    disk = tmp_path / "node.qcow2"
    spec = VmSpec(disk=disk, firmware="secureboot")
    assert nvram_of(spec, tmp_path / "run") == tmp_path / "node.qcow2.secureboot-vars.fd"


def test_an_unknown_firmware_is_refused(node_image: Path) -> None:
    proc = imgbase_cli("vm", "--live", str(node_image), "--firmware", "coreboot")
    assert proc.returncode == 2 and "invalid choice: 'coreboot'" in proc.stderr
