"""Bad input to `imgbase vm`: clear error, exit != 0, no qemu left behind."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from imgbase.vm import Guest, GuestError, VmSpec
from tests.conftest import imgbase_cli


def our_qemus(marker: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(marker) in line]


def refused(proc: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("imgbase: error: ") and "(hint: " in line, proc.stderr
    for phrase in phrases:
        assert phrase in line


def test_missing_squashfs(tmp_path: Path) -> None:
    refused(imgbase_cli("vm", "--live", str(tmp_path / "nope.squashfs"), "--run", "true"),
            "no such image")


def test_not_a_squashfs(tmp_path: Path) -> None:
    bad = tmp_path / "bad.squashfs"
    bad.write_bytes(b"\0" * 4096)
    refused(imgbase_cli("vm", "--live", str(bad), "--run", "true"), "is not a squashfs image")


def test_corrupt_squashfs(tmp_path: Path) -> None:
    bad = tmp_path / "bad.squashfs"
    bad.write_bytes(b"hsqs" + os.urandom(8192))
    refused(imgbase_cli("vm", "--live", str(bad), "--run", "true"), "corrupt squashfs")


@pytest.mark.slow
def test_truncated_image_has_no_kernel(node_image: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.squashfs"
    with open(node_image, "rb") as src:
        cut.write_bytes(src.read(1 << 20))
    proc = imgbase_cli("vm", "--live", str(cut), "--run", "true")
    assert proc.returncode != 0
    assert "imgbase: error: " in proc.stderr and not our_qemus(cut)


def test_disk_without_boot_sector(tmp_path: Path) -> None:
    disk = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G"], check=True)
    refused(imgbase_cli("vm", "--disk", str(disk), "--run", "true"),
            "is not a bootable disk image")
    assert not our_qemus(disk)


def test_busy_port(tmp_path: Path) -> None:
    disk = tmp_path / "mbr.raw"
    disk.write_bytes(b"\0" * 510 + b"\x55\xaa")  # looks bootable: the port is what fails
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        refused(imgbase_cli("vm", "--disk", str(disk), "--port", str(port), "--run", "true"),
                f"port {port} on 127.0.0.1 is busy")


def test_qemu_not_installed(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(shutil.which("unsquashfs"), bindir / "unsquashfs")  # type: ignore[arg-type]
    refused(imgbase_cli("vm", "--live", str(tmp_path / "x.squashfs"), "--run", "true",
                        env={"PATH": str(bindir)}),
            "qemu-system-x86_64 is not installed", "apt-get install qemu-system-x86")


@pytest.mark.slow
@pytest.mark.vm
def test_guest_that_never_answers_fails_with_serial_tail(node_image: Path,
                                                         tmp_path: Path) -> None:
    guest = Guest(VmSpec(live=node_image, cmdline=("systemd.mask=ssh.service",)),
                  rundir=tmp_path / "run")
    guest.start()
    with pytest.raises(GuestError) as exc:
        guest.wait_ssh(timeout=20)
    assert "did not answer on SSH within 20 s" in exc.value.message
    assert "last serial lines" in str(exc.value) and "Linux" in guest.serial_log.read_text()
    assert guest.proc is not None and guest.proc.poll() is not None  # our qemu is gone
    assert not our_qemus(tmp_path)


@pytest.mark.slow
@pytest.mark.vm
def test_guest_whose_kernel_panics_fails_fast(node_image: Path, tmp_path: Path) -> None:
    proc = imgbase_cli("vm", "--live", str(node_image), "--append", "init=/bin/false",
                       "--serial-log", str(tmp_path / "serial.log"), "--run", "true",
                       timeout=300)
    assert proc.returncode == 1
    assert "qemu exited before the guest answered on SSH" in proc.stderr
    assert "Kernel panic" in (tmp_path / "serial.log").read_text(errors="replace")
    assert not our_qemus(tmp_path)


@pytest.mark.slow
@pytest.mark.vm
def test_qemu_dies_with_a_killed_imgbase(node_image: Path, tmp_path: Path) -> None:
    """Even SIGKILL of `imgbase vm` (no cleanup possible) leaves no qemu behind."""
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "imgbase", "vm", "--live", str(node_image),
                             "--serial-log", str(tmp_path / "serial.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not our_qemus(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert our_qemus(tmp_path), "qemu did not start"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while our_qemus(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not our_qemus(tmp_path)
