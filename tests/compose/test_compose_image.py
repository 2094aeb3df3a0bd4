"""Real composes of the default node image (slow: mmdebstrap, minutes on a cold cache)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testinfra

import imgbase
from imgbase.image.filelist import listing, read_listing
from tests.conftest import ROOT, compose_json, imgbase_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def host(image_tree: Path):  # type: ignore[no-untyped-def]
    return testinfra.get_host(str(image_tree), connection="chroot")


@pytest.mark.parametrize("package", [
    "libvirt-daemon-system", "qemu-system-x86", "lvm2", "thin-provisioning-tools", "grub-pc",
    "imgbase", "openssh-server", "linux-image-amd64", "shim-signed", "grub-efi-amd64-signed",
    "efibootmgr", "mokutil", "dosfstools",
])
def test_packages_installed(host, package: str) -> None:  # type: ignore[no-untyped-def]
    assert host.package(package).is_installed


def test_imgbase_inside_equals_composing_one(host) -> None:  # type: ignore[no-untyped-def]
    assert host.check_output("imgbase --version") == f"imgbase {imgbase.__version__}"
    assert host.package("imgbase").version == imgbase.__version__


def test_the_kernel_is_the_signed_generic_one_without_what_a_hypervisor_never_loads(
        host, image_tree: Path) -> None:  # type: ignore[no-untyped-def]
    import struct

    [kernel] = (image_tree / "boot").glob("vmlinuz-*-amd64")
    assert "cloud" not in kernel.name
    data = kernel.read_bytes()
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    offset, size = struct.unpack_from("<II", data, pe + 24 + 112 + 4 * 8)
    assert offset and size > 1000  # an Authenticode signature (Secure Boot)
    for rel in ("usr/lib/shim/shimx64.efi.signed",
                "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"):
        assert (image_tree / rel).is_file(), rel
    kver = kernel.name.removeprefix("vmlinuz-")
    modules = image_tree / "usr/lib/modules" / kver
    assert not (modules / "kernel/sound").exists()
    assert not (modules / "kernel/drivers/net/wireless").exists()
    assert (modules / "kernel/drivers/net/ethernet/intel").is_dir()  # server NICs stay
    assert (modules / "kernel/drivers/scsi/megaraid").is_dir()  # and RAID controllers
    dep = (modules / "modules.dep").read_text()
    assert "kernel/sound/" not in dep and "kernel/drivers/md/dm-thin-pool.ko" in dep
    # the module index was rebuilt: what is left resolves
    assert host.run(f"modprobe -S {kver} --show-depends dm-thin-pool").rc == 0


def test_node_identity_is_not_baked(host) -> None:  # type: ignore[no-untyped-def]
    assert host.file("/etc/machine-id").size == 0
    assert host.run("ls /etc/ssh/ | grep -c ssh_host_").stdout.strip() == "0"
    unit = host.file("/usr/lib/systemd/system/imgbase-ssh-hostkeys.service")
    assert unit.contains("ssh-keygen -q -t ed25519")
    assert host.file("/etc/ssh/sshd_config.d/imgbase-hostkeys.conf").contains("HostKey")
    assert host.file("/etc/systemd/system/multi-user.target.wants/"
                     "imgbase-ssh-hostkeys.service").is_symlink
    assert not host.file("/root/.ssh/authorized_keys").exists


def test_scratch_dirs_are_empty_and_world_writable(host) -> None:  # type: ignore[no-untyped-def]
    for path in ("/tmp", "/var/tmp"):
        assert host.file(path).is_directory and host.file(path).mode == 0o1777, path
        assert host.check_output(f"ls -A {path}") == "", path


def test_factory_etc_and_image_json(host, default_image) -> None:  # type: ignore[no-untyped-def]
    assert host.file("/usr/share/factory/etc/fstab").exists
    assert host.file("/usr/share/factory/etc/ssh/sshd_config").exists
    info = json.loads(host.file("/usr/lib/imgbase/image.json").content_string)
    assert info["nvr"] == default_image["nvr"] == "imgbase-node-1.0-1"
    assert info["layers"] == ["base", "virt", "agent", "site"]


def test_package_db_travels_with_the_image(host) -> None:  # type: ignore[no-untyped-def]
    assert host.file("/var/lib/dpkg").is_symlink
    assert host.file("/usr/lib/sysimage/dpkg/status").contains("Package: lvm2")
    assert host.file("/usr/lib/tmpfiles.d/imgbase-package-db.conf").contains("L+ /var/lib/dpkg")
    assert host.run("ls /var/lib/apt/lists | grep -v partial").stdout == ""


def test_initramfs_boots_thin_and_live(host) -> None:  # type: ignore[no-untyped-def]
    listing = host.check_output("lsinitramfs /boot/initrd.img-*")
    for needed in ("dm-thin-pool.ko", "squashfs.ko", "overlay.ko", "usr/sbin/lvm",
                   "scripts/local-bottom/imgbase-live", "scripts/local-block/imgbase-rescue",
                   "scripts/local-bottom/imgbase-rescue"):
        assert needed in listing


def test_the_file_listing_describes_the_image(image_tree: Path) -> None:
    """What an update's delta is computed from (imgbase.image.filelist): the image as unpacked
    from the squashfs, listed again, gives the very lines compose wrote into it."""
    written = read_listing(image_tree)
    assert written is not None and len(written) > 10_000
    assert written == listing(image_tree)


def test_services_enabled(host) -> None:  # type: ignore[no-untyped-def]
    wants = host.file("/etc/systemd/system/multi-user.target.wants").listdir()
    assert "libvirtd.service" in wants and "systemd-networkd.service" in wants
    # the base layer disables e2scrub (it would snapshot the node's LVs): installed, off
    assert host.file("/usr/lib/systemd/system/e2scrub_all.timer").exists
    assert not host.file("/etc/systemd/system/timers.target.wants/e2scrub_all.timer").exists
    assert "e2scrub_reap.service" not in wants


def test_manifest(default_image) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads(Path(str(default_image["manifest"])).read_text())
    sq = Path(str(default_image["squashfs"]))
    assert manifest["nvr"] == "imgbase-node-1.0-1"
    assert manifest["squashfs"]["sha256"] == default_image["sha256"]
    assert manifest["squashfs"]["size"] == sq.stat().st_size
    assert manifest["imgbase_version"] == imgbase.__version__
    assert manifest["source_date_epoch"] == 1767225600
    assert [layer["name"] for layer in manifest["layers"]] == ["base", "virt", "agent", "site"]
    assert all(len(layer["digest"]) == 64 for layer in manifest["layers"])
    pkgs = {p["name"]: p for p in manifest["packages"]}
    assert pkgs["lvm2"]["architecture"] == "amd64" and pkgs["imgbase"]["architecture"] == "all"
    assert manifest["tree"]["size"] > 400e6
    sha_line = sq.with_suffix(".sha256").read_text()
    # the sidecar imgbase sign and update look for, next to the image: the same line
    assert Path(f"{sq}.sha256").read_text() == sha_line
    assert sha_line == f"{default_image['sha256']}  {sq.name}\n"
    assert sq.with_name(sq.stem + ".compose.log").exists() or default_image["cached"]


def test_unchanged_recompose_reuses_the_cache(default_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = compose_json(ROOT / "images/node.toml", tmp_path)
    assert result["cached"] is True
    assert result["sha256"] == default_image["sha256"]
    assert (tmp_path / "imgbase-node-1.0-1.squashfs").stat().st_size > 100e6


def test_two_composes_are_byte_identical(default_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Same inputs and package versions -> the same squashfs, byte for byte."""
    first = default_image
    second = compose_json(ROOT / "images/node.toml", tmp_path / "b", "--rebuild")
    pkgs = [json.loads(Path(str(r["manifest"])).read_text())["packages"] for r in (first, second)]
    if pkgs[0] != pkgs[1]:  # the mirror moved since the cached build: build once more
        first, second = second, compose_json(ROOT / "images/node.toml", tmp_path / "c",
                                             "--rebuild")
    if first["sha256"] != second["sha256"]:
        diff = imgbase_cli("diff", str(first["squashfs"]), str(second["squashfs"]))
        pytest.fail(f"images differ; files:\n{diff.stdout[:3000]}{diff.stderr}")
    assert first["sha256"] == second["sha256"]


def test_interrupted_compose_leaves_nothing_reusable(tmp_path: Path) -> None:
    cache = Path(os.environ.get("IMGBASE_CACHE", "/var/cache/imgbase"))
    out = tmp_path / "out"
    trees = sorted(p.name for p in (cache / "trees").glob("*"))
    proc = subprocess.Popen(  # --rebuild: the packages installed, not a cached tree copied
        [sys.executable, "-m", "imgbase", "compose", str(ROOT / "images/node.toml"),
         "-o", str(out), "--json", "--release", "interrupted", "--rebuild"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    key = None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "compose-start":
            key = event["inputs_digest"]
        if event["event"] == "step-start" and event["step"] == "packages":
            break
    time.sleep(20)  # well into package installation
    assert proc.poll() is None, "compose ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert key and not (cache / "images" / key).exists()
    assert not list((cache / "images").glob(f"{key}.tmp-*"))
    assert not list(out.glob("*.squashfs")) and not list(out.glob("*.manifest.json"))
    assert not list((cache / "work").glob(f"{key[:16]}.*"))
    assert sorted(p.name for p in (cache / "trees").glob("*")) == trees  # no tree kept
    with open("/proc/self/mounts") as mounts:
        assert str(cache / "work") not in mounts.read()
