"""The boot-time merge of root's SSH keys from the ssh.authorized_keys.root credential."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from imgbase.node.credentials import merge_authorized_keys
from tests.conftest import ROOT


def test_new_keys_are_added_once_and_the_admins_are_kept(tmp_path: Path) -> None:
    home = tmp_path / "root"
    home.mkdir()
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh/authorized_keys").write_text("ssh-ed25519 AAAA admin\n")
    cred = tmp_path / "cred"
    cred.write_text("ssh-ed25519 BBBB vm\n\nssh-ed25519 AAAA admin\n")
    assert merge_authorized_keys(cred, home) == 1
    assert merge_authorized_keys(cred, home) == 0  # every boot: nothing twice
    keys = home / ".ssh/authorized_keys"
    assert keys.read_text() == "ssh-ed25519 AAAA admin\nssh-ed25519 BBBB vm\n"
    assert keys.stat().st_mode & 0o777 == 0o600


def test_the_boot_unit_runs_the_module_alone(tmp_path: Path) -> None:
    unit = (ROOT / "boot/systemd/imgbase-ssh-credential.service").read_text()
    assert "ExecStart=/usr/bin/python3 -I -m imgbase.node.credentials " in unit
    usage = subprocess.run([sys.executable, "-m", "imgbase.node.credentials"], cwd=ROOT,
                           capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
