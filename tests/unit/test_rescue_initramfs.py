"""The rescue boot's initramfs script (local-bottom/imgbase-rescue), run by sh with a
stand-in lvm: the fstab it writes into the overlay, and what it refuses to write there."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from imgbase.compose.debpkg import BOOT_DIR

SCRIPT = BOOT_DIR / "initramfs-tools/scripts/local-bottom/imgbase-rescue"
INITRAMFS_TOOLS = ("cat", "mv")  # in every initramfs-tools image (klibc-utils, busybox)


def rescue(tmp_path: Path, cmdline: str, lvs: str, overlay: bool = True) -> str | None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/fstab").write_text("# UNCONFIGURED FSTAB FOR BASE SYSTEM\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # only what the node's initramfs has besides the shell's builtins (no grep, tr, sed...)
    for tool in INITRAMFS_TOOLS:
        (bindir / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    (bindir / "lvm").write_text(f"#!/bin/sh\ncat <<'EOF'\n{lvs}EOF\n")
    (bindir / "lvm").chmod(0o755)
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    (tmp_path / "mounts").write_text(f"overlay {root} overlay rw,lowerdir=/run/x 0 0\n"
                                     if overlay else f"/dev/imgbase/n-1-1+1 {root} ext4 rw 0 0\n")
    env = {**os.environ, "PATH": str(bindir), "rootmnt": str(root),
           "ROOT": "/dev/imgbase/n-1-1", "IMGBASE_CMDLINE": str(tmp_path / "cmdline"),
           "IMGBASE_MOUNTS": str(tmp_path / "mounts")}
    subprocess.run(["/bin/sh", str(SCRIPT)], env=env, check=True, capture_output=True)
    return (root / "etc/fstab").read_text()


LVS = ("  n-1-1    imgbase:base\n"
       "  var      imgbase:mount=/var,imgbase:volume\n"
       "  var_log  imgbase:volume,imgbase:mount=/var/log\n"
       "  evil     imgbase:mount=/var/../etc,imgbase:volume\n"
       "  evil2    imgbase:mount=/x;reboot,imgbase:volume\n"
       "  rel      imgbase:mount=etc,imgbase:volume\n")


def test_rescue_mounts_boot_and_the_node_volumes(tmp_path: Path) -> None:
    fstab = rescue(tmp_path, "root=/dev/imgbase/n-1-1 imgbase.rescue imgbase.boot=0a-1b", LVS)
    lines = [line for line in fstab.splitlines() if not line.startswith("#")]
    assert [line.split()[:2] for line in lines] == [
        ["UUID=0a-1b", "/boot"], ["/dev/imgbase/var", "/var"],
        ["/dev/imgbase/var_log", "/var/log"]]
    assert all("nofail,x-systemd.before=local-fs.target" in line for line in lines)


def test_rescue_refuses_a_uuid_that_is_not_one(tmp_path: Path) -> None:
    fstab = rescue(tmp_path, "imgbase.rescue imgbase.boot=x/../y", "")
    assert "/boot" not in fstab


def test_without_rescue_the_fstab_is_left_alone(tmp_path: Path) -> None:
    fstab = rescue(tmp_path, "root=/dev/imgbase/n-1-1+1 imgbase.boot=0a", LVS)
    assert fstab == "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n"


def test_a_root_that_is_not_the_overlay_keeps_its_fstab(tmp_path: Path) -> None:
    """imgbase.rescue by hand on a layer's entry: that layer's own fstab is never written."""
    fstab = rescue(tmp_path, "root=/dev/imgbase/n-1-1+1 rw imgbase.rescue imgbase.boot=0a", LVS,
                   overlay=False)
    assert fstab == "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n"
