"""VM test harness: guests booted from the session's composed image.

Every guest is started through imgbase.vm (the API behind `imgbase vm`), gets
its own run directory under the test's tmp_path, is killed by pid at teardown,
and has the tail of its serial console attached to the report of a failing test.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from imgbase import package, trust
from imgbase.run import run
from imgbase.vm import Guest, VmSpec
from tests.images import derive, signing_key, stop_agent
from tests.vm.nodes import V3

SERIAL_TAIL = 60


@pytest.fixture(scope="session")
def node_image(default_image: dict[str, object]) -> Path:
    return Path(str(default_image["squashfs"]))


def _boot(spec: VmSpec, rundir: Path, registry: list[Guest]) -> Guest:
    guest = Guest(spec, rundir=rundir)
    registry.append(guest)
    guest.start()
    guest.wait_ssh()
    return guest


@pytest.fixture(scope="session")
def media_files(node_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v2 (signed), the v3 update package (signed image) and the key that verifies them."""
    work = tmp_path_factory.mktemp("media")
    files = work / "files"
    files.mkdir()
    home = signing_key(work / "gnupg", files / "trusted.gpg")
    for version in ("1.1", "1.2"):
        image = derive(node_image, files, version)
        trust.sign(str(image), homedir=str(home))
    stop_agent(home)
    package.build(str(files / f"{V3}.squashfs"), "deb", files)
    for suffix in ("", ".sha256", ".sha256.sig"):
        (files / f"{V3}.squashfs{suffix}").unlink()  # v3 travels in its package only
    return files


@pytest.fixture(scope="session")
def media(media_files: Path) -> Path:
    """media_files as a squashfs, for a guest to mount as a disk."""
    out = media_files.parent / "media.squashfs"
    run(["mksquashfs", str(media_files), str(out), "-quiet", "-no-progress", "-noI", "-noD",
         "-noF", "-noX"])
    return out


@pytest.fixture(scope="session")
def installed_disks(node_image: Path, tmp_path_factory: pytest.TempPathFactory
                    ) -> dict[str, Path]:
    """The disks the VM tests boot, all prepared in one live guest (one boot, not three).

    "minimal": `imgbase install` on a blank 20G disk, default options, after the refusals.
    "nist": a 10G disk that held an active volume group, installed over with --wipe
    --volumes nist --vg node2. "anaconda": what anaconda's autopart --type=thinp + liveimg
    leaves, adopted by `imgbase layout --init` as the kickstart's %post runs it.
    """
    work = tmp_path_factory.mktemp("install")
    disks = {"minimal": work / "minimal.qcow2", "nist": work / "nist.qcow2",
             "anaconda": work / "anaconda.qcow2"}
    for disk, size in ((disks["minimal"], "20G"), (disks["nist"], "10G"),
                       (work / "small.qcow2", "1G"), (disks["anaconda"], "20G")):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), size], check=True)
    # vdb, vdc, vdd, vde
    attach = (disks["minimal"], disks["nist"], work / "small.qcow2", disks["anaconda"])
    with Guest(VmSpec(live=node_image, attach=attach), rundir=work / "installer") as guest:
        not_yet = guest.run("imgbase status --json", check=False)
        assert not_yet.rc == 2 and "this is not an imgbase node" in not_yet.stderr
        refuse_bad_installs(guest)
        dry = json.loads(guest.run("imgbase install --disk /dev/vdb --dry-run --json").stdout)
        assert [s["name"] for s in dry["steps"]][:2] == ["wipe", "partition"]
        assert guest.run("blkid -p /dev/vdb", check=False).rc == 2  # the dry run wrote nothing
        guest.run("imgbase install --disk /dev/vdb --json", timeout=1200)
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
        adopt_like_anaconda(guest, "/dev/vde")
    return disks


ANACONDA_LIKE = Path(__file__).with_name("anaconda_like.sh")


def adopt_like_anaconda(guest: Guest, disk: str) -> None:
    """Lay `disk` out as anaconda would, then run `imgbase layout --init` as %post does:
    chrooted into the target. Its refusals, dry run and a cut-short first attempt too."""
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
    guest.run(f"{chroot} imgbase layout --init", timeout=900)
    again = guest.run(f"{chroot} imgbase layout --init", check=False)
    assert again.rc == 2 and "already on an imgbase node" in again.stderr
    guest.run("umount -R -l /mnt/sysimage && sync")


def refuse_bad_installs(guest: Guest) -> None:
    """Each bad install is refused with a one-line error, exit 2, and nothing written."""
    guest.run("mkfs.ext4 -q /dev/vdc && mkdir -p /mnt/c && mount /dev/vdc /mnt/c && "
              "mkdir -p /tmp/notimg/etc && mksquashfs /tmp/notimg /tmp/notimg.squashfs -quiet "
              "-no-progress")
    cases = [
        ("--disk /dev/vdd", "/dev/vdd is too small: 1.0 GiB, at least 8 GiB needed"),
        ("--disk /dev/vdc", "/dev/vdc is in use: /dev/vdc on /mnt/c mounted"),
        ("--disk /dev/vdb /tmp/notimg.squashfs", "is not an imgbase image"),
        ("--disk /dev/vdb /tmp/nothere.squashfs", "no such image"),
        ("--disk /dev/vdb --pool-size 30G", "--pool-size 30G does not fit on /dev/vdb"),
        ("--disk /dev/vdb --pool-size 30", "'30' is not a size"),
        ("--disk /dev/nope", "/dev/nope: no such disk"),
    ]
    for args, message in cases:
        proc = guest.run(f"imgbase install {args}", check=False)
        assert proc.rc == 2, (args, proc.stderr)
        assert message in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)
    assert guest.run("blkid -p /dev/vdb", check=False).rc == 2  # still blank
    assert guest.run("blkid -p /dev/vdd", check=False).rc == 2
    assert guest.run("findmnt -n -o SOURCE /mnt/c").stdout.strip() == "/dev/vdc"
    guest.run("umount /mnt/c && wipefs -q -a /dev/vdc")


@pytest.fixture
def boot(request: pytest.FixtureRequest, tmp_path: Path
         ) -> Iterator[Callable[..., Guest]]:
    """boot(**VmSpec fields) -> a guest up on SSH; live-boots the node image by default."""
    guests: list[Guest] = []
    request.node._imgbase_guests = guests
    image = request.getfixturevalue("node_image")

    def factory(**fields: Any) -> Guest:
        if "disk" not in fields:
            fields.setdefault("live", image)
        return _boot(VmSpec(**fields), tmp_path / f"guest{len(guests)}", guests)

    yield factory
    for guest in guests:
        guest.stop()


@pytest.fixture(scope="module")
def live_guest(request: pytest.FixtureRequest, node_image: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """One live guest shared by a module's read-only assertions."""
    rundir = tmp_path_factory.mktemp("live-guest")
    attach = rundir / "attached.raw"
    attach.write_bytes(b"\0" * (64 << 20))
    guests: list[Guest] = []
    request.module._imgbase_guests = guests
    guest = _boot(VmSpec(live=node_image, blank=("1G",), attach=(attach,)), rundir / "run",
                  guests)
    yield guest
    guest.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        guests = getattr(item, "_imgbase_guests", []) + getattr(
            getattr(item, "module", None), "_imgbase_guests", [])
        for i, guest in enumerate(guests):
            report.sections.append(
                (f"guest {i} serial console (last {SERIAL_TAIL} lines, {guest.serial_log})",
                 guest.serial_tail(SERIAL_TAIL)))
