"""What the VM tests boot, built once per session -- early, in a thread, when it can be.

Installing the disks (a live guest, ~4 min under TCG) and deriving the update media (~1 min
of mksquashfs) need only the composed image. ``start_early`` is called as soon as the
session's image exists (tests/conftest.py), when the selected tests will want these: the
work then runs in one background thread while the compose and unit tests run, and the
fixtures (tests/vm/conftest.py) wait for it. Run on its own, a fixture builds in the
foreground. An error in the thread is raised by the fixture that wanted the result.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgbase.image import package, trust
from imgbase.vm import Guest, VmSpec, nvram_of
from tests.images import derive, signing_key, stop_agent
from tests.vm.nodes import V3

ANACONDA_LIKE = Path(__file__).with_name("anaconda_like.sh")
WANTED = ("installed_disks", "media_files", "lifecycle_images")  # start_early builds


class Builds:
    """Named builds run one after the other in a daemon thread (a session cut short does
    not wait for it); each result is available as soon as its own build is done."""

    def __init__(self, todo: dict[str, Callable[[], Any]]) -> None:
        self.done = {name: threading.Event() for name in todo}
        self.values: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}
        threading.Thread(target=self._run, args=(todo,), daemon=True).start()

    def _run(self, todo: dict[str, Callable[[], Any]]) -> None:
        for name, fn in todo.items():
            try:
                self.values[name] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the fixture that waits
                self.errors[name] = exc
            self.done[name].set()

    def result(self, name: str) -> Any:
        self.done[name].wait()
        if name in self.errors:
            raise self.errors[name]
        return self.values[name]


_started: dict[str, Builds] = {}
_lock = threading.Lock()


def build(name: str, fn: Callable[[], Any]) -> Any:
    """The result of build `name`: the early one if it was started, else fn() now."""
    with _lock:
        builds = _started.get(name)
    return builds.result(name) if builds is not None else fn()


def start_early(image: Path, want: set[str], mktemp: Callable[[str], Path]) -> None:
    """Start the builds in `want` in one thread, one after the other (installs first)."""
    builders = {"installed_disks": lambda: build_installed_disks(image, mktemp("install")),
                "media_files": lambda: build_media_files(image, mktemp("media")),
                "lifecycle_images": lambda: build_lifecycle_images(mktemp("lifecycle"))}
    with _lock:
        todo = {name: builders[name] for name in WANTED if name in want
                and name not in _started}
        if todo:
            builds = Builds(todo)
            _started.update(dict.fromkeys(todo, builds))


def build_media_files(node_image: Path, work: Path) -> Path:
    """v2 (signed), the v3 update package (signed image) and the key that verifies them."""
    files = work / "files"
    files.mkdir()
    home = signing_key(work / "gnupg", files / "trusted.gpg")
    for version in ("1.1", "1.2"):
        image = derive(node_image, files, version)
        trust.sign(str(image), homedir=str(home))
    stop_agent(home)
    package.build(str(files / f"{V3}.squashfs"), "deb", files, trusted=files)  # trusted.gpg
    for suffix in ("", ".sha256", ".sha256.sig"):
        (files / f"{V3}.squashfs{suffix}").unlink()  # v3 travels in its package only
    return files


E2E_MARK = "etc/imgbase-e2e-site"  # the file the changed site layer adds in v2


def build_lifecycle_images(work: Path) -> Path:
    """tests/e2e: v2, a real compose of the default image with its site layer changed
    (version 1.1), and v3 (1.2), v2 broken on purpose: its initramfs is junk, so it cannot
    boot. Both signed; the public key is trusted.gpg. The directory is served over HTTP."""
    from imgbase.compose.build import DEFAULT_CACHE
    from imgbase.image.squashfs import sha256_file
    from tests.conftest import ROOT

    src = work / "src"
    for part in ("images", "layers"):
        shutil.copytree(ROOT / part, src / part)
    (src / "layers/site/files" / E2E_MARK).write_text("site layer of v2\n")
    files = work / "files"
    def compose_v2() -> subprocess.CompletedProcess[str]:
        run = subprocess.run(
            [sys.executable, "-m", "imgbase", "compose", str(src / "images/node.toml"), "-o",
             str(files), "--image-version", "1.1", "--json"], capture_output=True, text=True,
            cwd=ROOT)
        if run.returncode != 0:
            raise AssertionError(f"compose of v2 failed: {run.stderr[-2000:]}")
        return run

    compose = compose_v2()
    events = [json.loads(line) for line in compose.stdout.splitlines()]
    if any(e.get("step") == "cache" for e in events):
        # an earlier run of the same sources left v2 in the image cache: drop it, so that
        # this run composes v2 for real on the kept package tree (tests/e2e reads the steps)
        key = next(e["inputs_digest"] for e in events if e["event"] == "compose-start")
        shutil.rmtree(DEFAULT_CACHE.resolve() / "images" / key)
        compose = compose_v2()
    (work / "compose-v2.jsonl").write_text(compose.stdout)  # tests/compose reads its steps
    v2 = files / "imgbase-node-1.1-1.squashfs"

    def junk_initramfs(tree: Path) -> None:
        for initrd in (tree / "boot").glob("initrd.img-*"):
            initrd.write_bytes(b"not an initramfs\n" * 4096)

    v3 = derive(v2, files, "1.2", share=0.0, alter=junk_initramfs)
    home = signing_key(work / "gnupg", files / "trusted.gpg")
    for image in (v2, v3):
        Path(f"{image}.sha256").write_text(f"{sha256_file(image)}  {image.name}\n")
        trust.sign(str(image), homedir=str(home))
    stop_agent(home)
    return files


def build_installed_disks(node_image: Path, work: Path) -> dict[str, Path]:
    """The disks the VM tests boot, all prepared in one live guest (one boot, not three).

    "minimal": `imgbase install` on a blank 20G disk, default options but --menu-timeout 0
    (as a fleet that reboots often would: the ~30 boots of the suite skip GRUB's 2 s
    wait), after the refusals.
    "nist": a 10G disk that held an active volume group, installed over with --wipe
    --volumes nist --vg node2. "anaconda": what anaconda's autopart --type=thinp + liveimg
    leaves, adopted by `imgbase layout --init` as the kickstart's %post runs it.
    """
    disks = {"minimal": work / "minimal.qcow2", "nist": work / "nist.qcow2",
             "anaconda": work / "anaconda.qcow2"}
    for disk, size in ((disks["minimal"], "20G"), (disks["nist"], "10G"),
                       (work / "small.qcow2", "1G"), (disks["anaconda"], "20G")):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), size], check=True)
    # vdb, vdc, vdd, vde
    attach = (disks["minimal"], disks["nist"], work / "small.qcow2", disks["anaconda"])
    live, key = signed_live_image(node_image, work / "signed")
    # the installer runs under UEFI with Secure Boot (a server's firmware, EFI variables
    # writable): each install adds its NVRAM boot entry, and the nist disk is later booted
    # with this machine's NVRAM (tests/vm/test_uefi.py)
    with Guest(VmSpec(live=live, attach=attach, trusted=(key,), firmware="secureboot"),
               rundir=work / "installer") as guest:
        # the firmware enforces Secure Boot: the live kernel it started is signed
        assert "Secure boot enabled" in guest.run("dmesg | grep secureboot:").stdout
        not_yet = guest.run("imgbase status --json", check=False)
        assert not_yet.rc == 2 and "this machine is not an imgbase node" in not_yet.stderr
        refuse_bad_installs(guest)
        dry = json.loads(guest.run("imgbase install --disk /dev/vdb --dry-run --json").stdout)
        assert [s["name"] for s in dry["steps"]][:2] == ["wipe", "partition"]
        assert guest.run("blkid -p /dev/vdb", check=False).rc == 2  # the dry run wrote nothing
        guest.run("imgbase install --disk /dev/vdb --menu-timeout 0 --json", timeout=1200)
        again = guest.run("imgbase install --disk /dev/vdb", check=False)
        assert again.rc == 2 and "in use by LVM" in again.stderr
        # vdc holds an active volume group with an LV: refused, then wiped with --wipe
        guest.run("pvcreate -q /dev/vdc && vgcreate -q stale /dev/vdc && "
                  "lvcreate -q -L 64M -n old stale")
        held = guest.run("imgbase install --disk /dev/vdc", check=False)
        assert held.rc == 2 and "in use by LVM: physical volume /dev/vdc" in held.stderr
        clash = guest.run("imgbase install --disk /dev/vdc --wipe", check=False)
        assert clash.rc == 2 and "volume group named imgbase already exists" in clash.stderr
        assert guest.run("lvs --noheadings -o lv_name stale").stdout.split() == ["old"]
        guest.run("imgbase install --disk /dev/vdc --wipe --volumes nist --vg node2",
                  timeout=1200)
        assert guest.run("vgs stale", check=False).rc != 0
        entries = guest.run("efibootmgr").stdout
        # one: each install replaces the entries labelled imgbase (nist's, installed last)
        assert entries.count("* imgbase") == 1, entries
        # (before the anaconda-like chroot: its `umount -R` of the bound /sys propagates,
        # and takes efivarfs away from this live system)
        adopt_like_anaconda(guest, "/dev/vde", kickstart_post(node_image, work))
        # nothing left active: dmeventd does not stop while it monitors a thin pool, and
        # the poweroff would wait on it until qemu is killed (the disks unflushed)
        guest.run("vgchange -an anaconda")
        t0 = time.monotonic()
        guest.stop(timeout=120)
        assert guest.proc is not None and guest.proc.returncode == 0, "no clean poweroff"
        print(f"installer powered off in {time.monotonic() - t0:.0f} s")
    # the NVRAM of the machine that installed the disk goes with it, as in a server
    shutil.copyfile(work / "installer" / "secureboot-vars.fd",
                    nvram_of(VmSpec(disk=disks["nist"], firmware="secureboot"), work))
    return disks


def signed_live_image(node_image: Path, work: Path) -> tuple[Path, Path]:
    """The session's image as the live installer boots it, signed: a link to it with its
    own .sha256 and .sha256.sig (the session's image stays as it is), and the public key
    that the live guest is given to trust (`imgbase install` verifies the running image
    against /run/imgbase/live/image.sha256 and .sig, which the Guest hands it)."""
    from imgbase.image.squashfs import sha256_file

    work.mkdir(parents=True)
    live = work / node_image.name
    live.symlink_to(node_image.resolve())
    Path(f"{live}.sha256").write_text(f"{sha256_file(node_image)}  {live.name}\n")
    home = signing_key(work / "gnupg", work / "trusted.gpg")
    trust.sign(str(live), homedir=str(home))
    stop_agent(home)
    return live, work / "trusted.gpg"


KICKSTART_KARG = "imgbase.test=kickstart"


def kickstart_post(image: Path, work: Path) -> str:
    """The %post of the default install kickstart, rendered for this image as an admin
    would (`imgbase kickstart render`, which validates it with pykickstart), with an SSH
    key and a kernel argument from the site flags."""
    from pykickstart.constants import KS_SCRIPT_POST
    from pykickstart.parser import KickstartParser
    from pykickstart.version import makeVersion

    key = work / "kickstart-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kickstart-test",
                    "-f", str(key)], check=True)
    ks = work / "node.ks"
    subprocess.run([sys.executable, "-m", "imgbase", "kickstart", "render", "--image",
                    str(image), "--url", f"http://images.invalid/{image.name}",
                    "--ssh-key", f"{key}.pub", "--karg", KICKSTART_KARG, "-o", str(ks)],
                   check=True, capture_output=True)
    handler = makeVersion("RHEL9")
    KickstartParser(handler, errorsAreFatal=True).readKickstartFromString(ks.read_text())
    [post] = [s for s in handler.scripts if s.type == KS_SCRIPT_POST]
    assert post.inChroot and post.errorOnFail
    script: str = post.script
    return script



def adopt_like_anaconda(guest: Guest, disk: str, post: str) -> None:
    """Lay `disk` out as anaconda would, then run the kickstart's rendered %post as anaconda
    does: chrooted into the target, with /bin/sh, failing on error (it runs `imgbase layout
    --init`). Before it, layout --init's refusals, dry run and a cut-short first attempt."""
    guest.run(f"cat > /tmp/anaconda_like.sh <<'EOF'\n{ANACONDA_LIKE.read_text()}EOF\n")
    guest.run(f"sh /tmp/anaconda_like.sh {disk} anaconda", timeout=900)
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
    guest.run(f"cat > /mnt/sysimage/tmp/ks-post.sh <<'IMGBASE_KS_EOF'\n{post}\n"
              "IMGBASE_KS_EOF\n")
    guest.run(f"{chroot} /bin/sh /tmp/ks-post.sh && rm /mnt/sysimage/tmp/ks-post.sh",
              timeout=900)
    again = guest.run(f"{chroot} imgbase layout --init", check=False)
    assert again.rc == 2 and "already on an imgbase node" in again.stderr
    guest.run("umount -R -l /mnt/sysimage && sync")


def refuse_bad_installs(guest: Guest) -> None:
    """Each bad install is refused with a one-line error, exit 2 (65: an image refused for
    what it is, here a forged checksum), and nothing written."""
    guest.run("mkfs.ext4 -q /dev/vdc && mkdir -p /mnt/c && mount /dev/vdc /mnt/c && "
              "mkdir -p /tmp/notimg/etc && mksquashfs /tmp/notimg /tmp/notimg.squashfs -quiet "
              "-no-progress")
    # the running image's checksum without its signature, and a forged checksum under
    # the real signature
    live = "/run/imgbase/live/image.sha256"
    guest.run(f"cp {live} /tmp/unsigned.sha256 && cp {live}.sig /tmp/forged.sha256.sig && "
              f"echo {'0' * 64} > /tmp/forged.sha256")
    cases = [
        ("--disk /dev/vdd", "/dev/vdd is too small: 1.0 GiB, at least 8 GiB needed"),
        ("--disk /dev/vdc", "/dev/vdc is in use: /dev/vdc on /mnt/c mounted"),
        ("--disk /dev/vdb /tmp/notimg.squashfs",
         "/tmp/notimg.squashfs.sha256 is missing: the image cannot be verified"),
        ("--disk /dev/vdb --insecure", "--insecure is not allowed on this node"),
        ("--disk /dev/vdb --sha256 /tmp/unsigned.sha256",
         "is not signed (/tmp/unsigned.sha256.sig is missing)"),
        ("--disk /dev/vdb --sha256 /tmp/forged.sha256", "/tmp/forged.sha256.sig is BAD"),
        ("--disk /dev/vdb /tmp/nothere.squashfs", "no such image"),
        ("--disk /dev/vdb --pool-size 30G", "--pool-size 30G does not fit on /dev/vdb"),
        ("--disk /dev/vdb --pool-size 30", "'30' is not a size"),
        ("--disk /dev/nope", "/dev/nope: no such disk"),
    ]
    for args, message in cases:
        proc = guest.run(f"imgbase install {args}", check=False)
        assert proc.rc == (65 if "forged" in args else 2), (args, proc.rc, proc.stderr)
        assert message in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)
    assert guest.run("blkid -p /dev/vdb", check=False).rc == 2  # still blank
    assert guest.run("blkid -p /dev/vdd", check=False).rc == 2
    assert guest.run("findmnt -n -o SOURCE /mnt/c").stdout.strip() == "/dev/vdc"
    guest.run("umount /mnt/c && wipefs -q -a /dev/vdc")
