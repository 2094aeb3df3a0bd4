"""Contract tests of the lorax backend: a fake livemedia-creator, not an integration test.

lorax is not available on Debian, so these tests put a fake ``livemedia-creator`` first
on PATH. The fake holds the real tool to its contract as far as it can be known here:
it parses the options with the real tool's names (pylorax ``lmc_parser``; an unknown
option exits 2), refuses an existing ``--resultdir``, checks the kickstart with the
rules of pylorax ``creator.check_kickstart`` (with pykickstart when it is installed),
and leaves the result layout of ``--make-pxe-live``: ``live-rootfs.squashfs.img``, a
squashfs whose ``LiveOS/rootfs.img`` is an ext4 image (``mkfs.ext4 -d``), next to the
disk image, the kernel, the initramfs and ``PXE_CONFIG``. The ext4 root holds a real rpm
database with a tiny rpm built by rpmbuild, a setuid binary, a file capability, hard
links and a symlinked /var/lib/rpm, as a Fedora root does. What the real anaconda
install does (the kickstart's %post) is not reproduced.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgbase.compose.backend import BuildContext, ComposerBackend, Package
from imgbase.compose.lorax import (
    LIVE_IMAGE,
    NOT_ON_DEBIAN,
    LmcJob,
    LoraxBackend,
    extract_ext4,
    unwrap_live_image,
)
from imgbase.compose.rpmdb import rpm_packages
from imgbase.errors import ImgbaseError, InputError
from imgbase.image.spec import ImageSpec, LayerSpec, Services
from imgbase.progress import Progress
from imgbase.run import CommandError, stream

TOOLS = ("mkfs.ext4", "mksquashfs", "unsquashfs", "debugfs", "rpm", "rpmbuild")
pytestmark = [
    pytest.mark.contract,
    pytest.mark.skipif(os.geteuid() != 0, reason="contract test: owners, file capabilities "
                       "and rpm --root need root"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason=f"contract test needs {', '.join(TOOLS)}"),
]

EPOCH = 1767225600
KVER = "6.8.5-301.fc40.x86_64"
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+p

FAKE_LMC = r'''
"""A fake livemedia-creator (see tests/compose/test_lorax_contract.py)."""
import argparse, json, os, re, shutil, subprocess, sys, time

def log(msg):
    print(time.strftime("%Y-%m-%d %H:%M:%S,000: ") + msg, flush=True)

p = argparse.ArgumentParser(prog="livemedia-creator")
action = p.add_mutually_exclusive_group(required=True)
for a in ("--make-iso", "--make-disk", "--make-fsimage", "--make-pxe-live", "--make-tar"):
    action.add_argument(a, action="store_true")
p.add_argument("--ks", action="append", type=os.path.abspath)
p.add_argument("--no-virt", action="store_true")
p.add_argument("--logfile", default="./livemedia.log", type=os.path.abspath)
p.add_argument("--tmp", default="/var/tmp", type=os.path.abspath)
p.add_argument("--resultdir", default=None, dest="result_dir", type=os.path.abspath)
p.add_argument("--project", default="Linux")
p.add_argument("--releasever", default="32")
p.add_argument("--iso", type=os.path.abspath)
opts = p.parse_args()

record = os.environ.get("FAKE_LMC_RECORD")
ks_text = open(opts.ks[0]).read() if opts.ks and os.path.exists(opts.ks[0]) else None
if record:
    json.dump({"argv": sys.argv[1:], "ks": ks_text}, open(record, "w"))

# livemedia-creator main(): refusals of the options
errors = []
if not opts.ks:
    errors.append("Image creation requires a kickstart file")
elif ks_text is None:
    errors.append("kickstart file (%s) is missing." % opts.ks[0])
if opts.result_dir and os.path.exists(opts.result_dir):
    errors.append("The results_dir (%s) should not exist, please delete or "
                  "move its contents" % opts.result_dir)
if not opts.no_virt and not opts.iso:
    errors.append("virt install needs an install iso.")
if not opts.make_pxe_live:
    errors.append("this fake only makes --make-pxe-live results")
if errors:
    for e in errors:
        log("ERROR: " + e)
    sys.exit(1)

# pylorax creator.check_kickstart
def parsed(text):
    try:
        from pykickstart.parser import KickstartParser
        from pykickstart.version import makeVersion
    except ImportError:
        return None
    ks = KickstartParser(makeVersion(), errorsAreFatal=False, missingIncludeIsFatal=False)
    ks.readKickstartFromString(text)
    h = ks.handler
    return {"method": h.method.method, "network": h.network.seen, "repo": h.repo.seen,
            "display": h.displaymode.displayMode is not None, "autopart": h.autopart.seen,
            "mounts": [q.mountpoint for q in h.partition.partitions],
            "ostree": h.ostreesetup.seen, "packages": list(h.packages.packageList)}

def scanned(text):
    lines = [l.strip() for l in text.splitlines()]
    cmds = [l.split()[0] for l in lines if l and not l.startswith("#")]
    body = text.split("%packages", 1)[1].split("%end", 1)[0].splitlines()[1:] \
        if "%packages" in text else []
    return {"method": next((c for c in cmds if c in ("url", "nfs", "cdrom", "harddrive",
                                                      "liveimg")), None),
            "network": "network" in cmds, "repo": "repo" in cmds,
            "display": any(c in ("text", "cmdline", "graphical") for c in cmds),
            "autopart": "autopart" in cmds,
            "mounts": [l.split()[1] for l in lines if l.startswith("part ")],
            "ostree": "ostreesetup" in cmds,
            "packages": [l.strip() for l in body
                         if l.strip() and l.strip()[0] not in "#@-"]}

ks = parsed(ks_text) or scanned(ks_text)
if opts.no_virt and ks["method"] not in ("url", "nfs") and not ks["ostree"]:
    errors.append("Only url, nfs and ostreesetup install methods are currently supported."
                  "Please fix your kickstart file.")
if ks["repo"] and ks["method"] != "url":
    errors.append("repo can only be used with the url install method. Add url to your "
                  "kickstart file.")
if ks["method"] in ("url", "nfs") and not ks["network"]:
    errors.append("The kickstart must activate networking if "
                  "the url or nfs install method is used.")
if ks["display"]:
    errors.append("The kickstart must not set a display mode (text, cmdline, "
                  "graphical), this will interfere with livemedia-creator.")
if any(m not in ("/", "swap") for m in ks["mounts"]) or ks["autopart"]:
    errors.append("Filesystem images must use a single / part, not autopart or "
                  "multiple partitions. swap is allowed but not used.")
if errors:
    for e in errors:
        log(e)
    sys.exit(1)

os.makedirs(opts.result_dir)
logdir = os.path.dirname(opts.logfile)
os.makedirs(os.path.join(logdir, "anaconda"), exist_ok=True)
open(opts.logfile, "a").write("livemedia-creator (fake)\n")
program_log = os.path.join(logdir, "anaconda", "program.log")
if os.environ.get("FAKE_LMC_FAIL"):
    open(program_log, "w").write("Running... dnf install\nError: nothing provides libfoo\n")
    log("Install failed: process '['anaconda', ...]' exited with status 1")
    log("ERROR: Image creation failed: process exited with status 1")
    sys.exit(1)
open(program_log, "w").write("installed\n")

# "anaconda": the root file system, as a Fedora install leaves it
log("Running anaconda.")
root = os.path.join(opts.tmp, "lmc-root")
def put(rel, data="", mode=0o644):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").write(data)
    os.chmod(path, mode)
    return path
put("etc/os-release", 'NAME="Fedora Linux"\nVERSION_ID=%s\n' % opts.releasever)
for pkg in ks["packages"]:
    put("usr/share/fake-lmc/packages/" + pkg, pkg + "\n")
put("usr/bin/sudo", "#!/bin/sh\n", 0o4111)
arping = put("usr/sbin/arping", "#!/bin/sh\n", 0o755)
os.setxattr(arping, "security.capability", bytes.fromhex(os.environ["FAKE_LMC_CAP"]))
os.link(put("usr/bin/gzip", "gzip\n", 0o755), os.path.join(root, "usr/bin/gunzip"))
os.chown(put("var/lib/chrony/drift", "0.0\n"), 1234, 1234)
os.makedirs(os.path.join(root, "tmp"))
os.chmod(os.path.join(root, "tmp"), 0o1777)
put("boot/vmlinuz-" + os.environ["FAKE_LMC_KVER"], "kernel\n", 0o755)
put("boot/initramfs-%s.img" % os.environ["FAKE_LMC_KVER"], "initramfs\n", 0o600)
os.makedirs(os.path.join(root, "var/lib"), exist_ok=True)
os.symlink("../../usr/lib/sysimage/rpm", os.path.join(root, "var/lib/rpm"))
subprocess.run(["rpm", "--root", root, "--dbpath", "/usr/lib/sysimage/rpm", "-i", "--nodeps",
                "--noscripts", "--ignorearch", "--ignoreos", os.environ["FAKE_LMC_RPM"]],
               check=True, capture_output=True)

# pylorax creator.make_image (no-virt: an fs image in the result dir) + make_live_images
disk = os.path.join(opts.result_dir, "lmc-disk-fake0001.img")
subprocess.run(["mkfs.ext4", "-q", "-L", "Anaconda", "-d", root, disk, "64M"], check=True)
work = os.path.join(opts.tmp, "lmc-work-fake")
os.makedirs(os.path.join(work, "squashfs_root", "LiveOS"))
os.link(disk, os.path.join(work, "squashfs_root", "LiveOS", "rootfs.img"))
log("Packing live rootfs image")
subprocess.run(["mksquashfs", os.path.join(work, "squashfs_root"),
                os.path.join(opts.result_dir, "live-rootfs.squashfs.img"), "-noappend",
                "-quiet", "-no-progress"], check=True)
log("Rebuilding initramfs for live")
kver = os.environ["FAKE_LMC_KVER"]
shutil.copy(os.path.join(root, "boot", "vmlinuz-" + kver), opts.result_dir)
open(os.path.join(opts.result_dir, "initramfs-%s.img" % kver), "w").write("live initramfs\n")
open(os.path.join(opts.result_dir, "PXE_CONFIG"), "w").write(
    "# PXE configuration template generated by livemedia-creator\n"
    "kernel <PXE_DIR>/vmlinuz-%s\nappend initrd=<PXE_DIR>/initramfs-%s.img "
    "root=live:<URL>/live-rootfs.squashfs.img\n" % (kver, kver))
shutil.rmtree(work)
shutil.rmtree(root)
log("SUMMARY")
log("Results are in %s" % opts.result_dir)
'''

#: a kickstart that passes livemedia-creator's checks (url, network, one / part, no display)
VALID_KS = textwrap.dedent("""\
    lang en_US.UTF-8
    keyboard --vckeymap=us
    timezone Etc/UTC --utc
    rootpw --lock
    network --bootproto=dhcp --activate
    url --url=https://repo.example.org/fedora/40/x86_64/os/
    zerombr
    clearpart --all --initlabel
    part / --fstype=ext4 --size=4096
    bootloader --location=mbr --append="console=ttyS0"
    shutdown
    %packages
    kernel
    systemd
    imgbase
    %end
    """)


# -- fixtures ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_rpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """imgbase-contract-hello-2:1.2-3.fc40.noarch.rpm, built with rpmbuild."""
    top = tmp_path_factory.mktemp("rpmbuild")
    spec = top / "hello.spec"
    spec.write_text(textwrap.dedent("""\
        Name: imgbase-contract-hello
        Epoch: 2
        Version: 1.2
        Release: 3.fc40
        Summary: a package for imgbase's contract tests
        License: MIT
        BuildArch: noarch
        %description
        contract test
        %install
        mkdir -p %{buildroot}/usr/share/imgbase-contract-hello
        echo hello > %{buildroot}/usr/share/imgbase-contract-hello/hello.txt
        %files
        /usr/share/imgbase-contract-hello/hello.txt
        """))
    subprocess.run(["rpmbuild", "-bb", "--define", f"_topdir {top}", "--define",
                    "_build_id_links none", str(spec)], check=True, capture_output=True)
    return next((top / "RPMS" / "noarch").glob("*.rpm"))


def install_rpm(root: Path, rpm: Path) -> None:
    """A real rpm database under root (Fedora's /usr/lib/sysimage/rpm) with ``rpm`` in it."""
    subprocess.run(["rpm", "--root", str(root), "--dbpath", "/usr/lib/sysimage/rpm", "-i",
                    "--nodeps", "--noscripts", "--ignorearch", "--ignoreos", str(rpm)],
                   check=True, capture_output=True)


HELLO = Package("imgbase-contract-hello", "2:1.2-3.fc40", "noarch")


@pytest.fixture
def fake_lmc(tmp_path: Path, tiny_rpm: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake first on PATH; returns the file it records its arguments and kickstart in."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    script = bindir / "livemedia-creator"
    script.write_text(f"#!{sys.executable}\n{FAKE_LMC}")
    script.chmod(0o755)
    record = tmp_path / "lmc-record.json"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LMC_RECORD", str(record))
    monkeypatch.setenv("FAKE_LMC_RPM", str(tiny_rpm))
    monkeypatch.setenv("FAKE_LMC_KVER", KVER)
    monkeypatch.setenv("FAKE_LMC_CAP", CAP_NET_RAW.hex())
    return record


def fedora_image(tmp_path: Path, *, files: bool = False) -> ImageSpec:
    layer_dir = tmp_path / "layers"
    (layer_dir / "base").mkdir(parents=True, exist_ok=True)
    toml = layer_dir / "base.toml"
    toml.write_text('[layer]\nname = "base"\n')
    tree = None
    if files:
        tree = layer_dir / "base" / "files"
        (tree / "etc").mkdir(parents=True, exist_ok=True)
        (tree / "etc" / "motd").write_text("a Fedora node\n")
    layer = LayerSpec(name="base", path=toml, packages=("kernel", "systemd", "imgbase"),
                      services=Services(enable=("sshd",)), kernel_args=("console=ttyS0",),
                      files=tree)
    return ImageSpec(path=tmp_path / "fnode.toml", name="fnode", version="1.0", release="1",
                     distro="fedora", suite="40", architecture="amd64", mirror="",
                     security_mirror="", backend="lorax", layers=(layer,),
                     source_date_epoch=EPOCH,
                     repos=("https://repo.example.org/fedora/40/x86_64/os/",), unsigned=True)


def context(tmp_path: Path, image: ImageSpec) -> BuildContext:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return BuildContext(image=image, workdir=work, cache_dir=tmp_path / "cache",
                        logfile=tmp_path / "compose.log",
                        progress=Progress(json_lines=True, stream=io.StringIO()))


def catalog(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path's type and mode, owner, content or link target, xattrs; and hard links."""
    inodes: dict[int, list[str]] = {}
    cat: dict[str, tuple[object, ...]] = {}
    for path in sorted([root, *root.rglob("*")]):
        rel = "/" + path.relative_to(root).as_posix().lstrip(".")
        st = path.lstat()
        content: object = None
        if stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
            inodes.setdefault(st.st_ino, []).append(rel)
        xattrs = {} if stat.S_ISLNK(st.st_mode) else {
            n: os.getxattr(path, n) for n in sorted(os.listxattr(path))}
        cat[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, content, xattrs,
                    int(st.st_mtime))
    cat["hard links"] = tuple(sorted(tuple(v) for v in inodes.values() if len(v) > 1))
    return cat


# -- the unwrapping, on an image this test makes ---------------------------------------

@pytest.fixture
def odd_tree(tmp_path: Path) -> Path:
    """What rdump alone gets wrong: setuid/setgid/sticky, xattrs, hard links, owners,
    symlink owners, a FIFO; and names with spaces and quotes, an empty directory."""
    src = tmp_path / "src"
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/sbin").mkdir(parents=True)
    (src / "usr/bin/sudo").write_text("sudo\n")
    (src / "usr/bin/sudo").chmod(0o4111)
    (src / "usr/bin/wall").write_text("wall\n")
    os.chown(src / "usr/bin/wall", 0, 5)
    (src / "usr/bin/wall").chmod(0o2755)
    (src / "usr/sbin/arping").write_text("arping\n")
    os.setxattr(src / "usr/sbin/arping", "security.capability", CAP_NET_RAW)
    os.setxattr(src / "usr/sbin/arping", "user.imgbase", b"a\x00b")
    (src / "usr/bin/gzip").write_text("gzip\n")
    os.link(src / "usr/bin/gzip", src / "usr/bin/gunzip")
    os.link(src / "usr/bin/gzip", src / "usr/bin/zcat")
    (src / "tmp").mkdir()
    (src / "tmp").chmod(0o1777)
    (src / "srv/shared").mkdir(parents=True)
    (src / "srv/shared").chmod(0o2775)
    os.chown(src / "srv/shared", 1234, 1234)
    os.setxattr(src / "srv", "security.selinux", b"system_u:object_r:var_t:s0\x00")
    (src / "etc").mkdir()
    os.symlink("../usr/bin/sudo", src / "etc/sudo-link")
    os.lchown(src / "etc/sudo-link", 1234, 1234)
    os.mkfifo(src / "etc/initctl", 0o600)
    (src / 'etc/a name with "quotes" and spaces').write_text("odd\n")
    (src / "var/empty/deep/er").mkdir(parents=True)
    for path in [*src.rglob("*")]:
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)
    return src


def live_image_of(src: Path, out: Path) -> Path:
    """As livemedia-creator does: ext4 image as LiveOS/rootfs.img in a squashfs."""
    (out / "sq/LiveOS").mkdir(parents=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(src), str(out / "sq/LiveOS/rootfs.img"),
                    "32M"], check=True)
    live = out / LIVE_IMAGE
    subprocess.run(["mksquashfs", str(out / "sq"), str(live), "-quiet", "-no-progress"],
                   check=True)
    return live


def test_contract_unwrap_keeps_what_rdump_alone_loses(tmp_path: Path, odd_tree: Path) -> None:
    """Contract: squashfs -> LiveOS/rootfs.img -> tree equals the installed root exactly."""
    live = live_image_of(odd_tree, tmp_path / "out")
    tree = tmp_path / "tree"
    unwrap_live_image(live, tree, tmp_path / "scratch")
    assert catalog(tree) == catalog(odd_tree)
    assert not (tmp_path / "scratch").exists()


def test_contract_rdump_alone_would_lose_setuid_and_xattrs(tmp_path: Path,
                                                           odd_tree: Path) -> None:
    """Contract: the fix-ups are needed with this debugfs (else the test above is moot)."""
    live_image_of(odd_tree, tmp_path / "out")
    plain = tmp_path / "plain"
    plain.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {plain}",
                    str(tmp_path / "out/sq/LiveOS/rootfs.img")], check=True,
                   capture_output=True)
    assert stat.S_IMODE((plain / "usr/bin/sudo").stat().st_mode) != 0o4111
    assert os.listxattr(plain / "usr/sbin/arping") == []


def test_contract_device_node_is_refused_by_name(tmp_path: Path) -> None:
    """Contract: rdump cannot extract a device node; the unwrap says which, not drops it."""
    src = tmp_path / "src"
    (src / "dev").mkdir(parents=True)
    os.mknod(src / "dev/console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    subprocess.run(["mkfs.ext4", "-q", "-d", str(src), str(tmp_path / "r.img"), "8M"],
                   check=True)
    with pytest.raises(ImgbaseError, match="device node or socket /dev/console"):
        extract_ext4(tmp_path / "r.img", tmp_path / "tree", tmp_path / "x")


def test_contract_not_a_pxe_live_result(tmp_path: Path) -> None:
    """Contract: a squashfs without LiveOS/rootfs.img is named as such."""
    (tmp_path / "sq/LiveOS").mkdir(parents=True)
    (tmp_path / "sq/LiveOS/squashfs.img").write_text("no")
    live = tmp_path / LIVE_IMAGE
    subprocess.run(["mksquashfs", str(tmp_path / "sq"), str(live), "-quiet", "-no-progress"],
                   check=True)
    with pytest.raises(ImgbaseError, match="has no LiveOS/rootfs.img"):
        unwrap_live_image(live, tmp_path / "tree", tmp_path / "scratch")


# -- the fake livemedia-creator --------------------------------------------------------

def run_fake(tmp_path: Path, ks_text: str) -> LmcJob:
    base = tmp_path / "lorax"
    job = LmcJob(kickstart=base / "build.ks", resultdir=base / "result", tmpdir=base / "tmp",
                 logfile=base / "logs" / "livemedia.log", project="fnode", releasever="40")
    job.tmpdir.mkdir(parents=True)
    job.logfile.parent.mkdir(parents=True)
    job.kickstart.write_text(ks_text)
    stream(job.argv(), logfile=tmp_path / "compose.log")
    return job


def test_contract_lmc_argv_and_result_layout(tmp_path: Path, fake_lmc: Path) -> None:
    """Contract: the argv passes the real option names; the result is the real layout."""
    job = run_fake(tmp_path, VALID_KS)
    argv = json.loads(fake_lmc.read_text())["argv"]
    assert argv[:2] == ["--make-pxe-live", "--no-virt"]
    assert argv[argv.index("--releasever") + 1] == "40"
    assert argv[argv.index("--project") + 1] == "fnode"
    assert sorted(p.name for p in job.resultdir.iterdir()) == sorted([
        LIVE_IMAGE, "lmc-disk-fake0001.img", f"vmlinuz-{KVER}", f"initramfs-{KVER}.img",
        "PXE_CONFIG"])
    listing = subprocess.run(["unsquashfs", "-l", "-d", "", str(job.resultdir / LIVE_IMAGE)],
                             check=True, capture_output=True, text=True).stdout.split()
    assert "/LiveOS/rootfs.img" in listing


def test_contract_lmc_result_unwrapped_into_the_tree(tmp_path: Path, fake_lmc: Path) -> None:
    """Contract: the fake's Fedora-like root comes out whole, rpm database included."""
    job = run_fake(tmp_path, VALID_KS)
    tree = tmp_path / "tree"
    unwrap_live_image(job.resultdir / LIVE_IMAGE, tree, tmp_path / "scratch")
    assert "VERSION_ID=40" in (tree / "etc/os-release").read_text()
    assert sorted(p.name for p in (tree / "usr/share/fake-lmc/packages").iterdir()) == [
        "imgbase", "kernel", "systemd"]
    assert stat.S_IMODE((tree / "usr/bin/sudo").stat().st_mode) == 0o4111
    assert stat.S_IMODE((tree / "tmp").stat().st_mode) == 0o1777
    assert os.getxattr(tree / "usr/sbin/arping", "security.capability") == CAP_NET_RAW
    assert (tree / "usr/bin/gzip").stat().st_ino == (tree / "usr/bin/gunzip").stat().st_ino
    drift = (tree / "var/lib/chrony/drift").stat()
    assert (drift.st_uid, drift.st_gid) == (1234, 1234)
    assert os.readlink(tree / "var/lib/rpm") == "../../usr/lib/sysimage/rpm"
    assert (tree / f"boot/vmlinuz-{KVER}").is_file()
    assert not (tree / "lost+found").exists()
    assert rpm_packages(tree) == [HELLO]
    assert LoraxBackend().installed_packages(tree) == [HELLO]


def test_contract_fake_refuses_what_livemedia_creator_refuses(tmp_path: Path,
                                                              fake_lmc: Path) -> None:
    """Contract: the fake is not a pushover: a display mode and no network are refused."""
    with pytest.raises(CommandError):
        run_fake(tmp_path, "text\n" + VALID_KS.replace("network --bootproto=dhcp --activate\n",
                                                       ""))
    log = (tmp_path / "compose.log").read_text()
    assert "must not set a display mode" in log
    assert "must activate networking" in log


# -- the backend ---------------------------------------------------------------------

def test_contract_lorax_backend_registers_and_says_why_it_cannot_run_here() -> None:
    """Contract: registered as "lorax"; on Debian, the reason names Debian."""
    assert isinstance(ComposerBackend.get("lorax"), LoraxBackend)
    if shutil.which("livemedia-creator") is None:
        assert LoraxBackend.runs_here is not None
        assert "not available on Debian" in LoraxBackend.runs_here


def test_contract_build_tree_without_livemedia_creator(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Contract: no livemedia-creator on PATH -> a refusal that names Debian, not apt."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InputError) as err:
        LoraxBackend().build_tree(context(tmp_path, fedora_image(tmp_path)), tmp_path / "tree")
    assert err.value.message == NOT_ON_DEBIAN


def test_contract_build_tree_renders_runs_and_unwraps(tmp_path: Path, fake_lmc: Path) -> None:
    """Contract: build_tree hands the rendered build kickstart to livemedia-creator and
    unwraps the result (fails while kickstarts/build-pxe-live.ks.j2 sets a display mode
    and does not activate the network: livemedia-creator refuses both)."""
    image = fedora_image(tmp_path)
    ctx = context(tmp_path, image)
    tree = tmp_path / "tree"
    try:
        LoraxBackend().build_tree(ctx, tree)
    except CommandError:
        log = ctx.logfile.read_text()
        refusals = [m for m in ("must not set a display mode", "must activate networking")
                    if m in log]
        if refusals:
            pytest.xfail(f"the rendered build kickstart is refused by livemedia-creator's "
                         f"check_kickstart: {', '.join(refusals)} (kickstarts/build-pxe-live)")
        raise
    recorded = json.loads(fake_lmc.read_text())
    assert "%packages" in recorded["ks"] and "liveimg" not in recorded["ks"]
    packages = sorted(p.name for p in (tree / "usr/share/fake-lmc/packages").iterdir())
    assert {"kernel", "systemd", "imgbase"} <= set(packages)
    assert LoraxBackend().installed_packages(tree) == [HELLO]
    assert not (ctx.workdir / "lorax" / "result").exists()


def test_contract_failed_install_keeps_anacondas_log(tmp_path: Path, fake_lmc: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Contract: a failing livemedia-creator -> CommandError; anaconda's log in ours."""
    monkeypatch.setenv("FAKE_LMC_FAIL", "1")
    ctx = context(tmp_path, fedora_image(tmp_path))
    with pytest.raises(CommandError) as err:
        LoraxBackend().build_tree(ctx, tmp_path / "tree")
    assert err.value.hint and str(ctx.logfile) in err.value.hint
    log = ctx.logfile.read_text()
    assert "# build kickstart" in log
    if "Install failed" in log:  # not refused before (see the test above)
        assert "anaconda/program.log" in log and "nothing provides libfoo" in log


def test_contract_check_image_refuses_what_a_kickstart_cannot_carry(tmp_path: Path) -> None:
    """Contract: the renderer's refusal (a FIFO in files/) reaches check_image, by layer."""
    image = fedora_image(tmp_path, files=True)
    assert image.layers[0].files is not None
    os.mkfifo(image.layers[0].files / "etc" / "initctl")
    with pytest.raises(InputError, match="layer 'base'"):
        LoraxBackend().check_image(image)


@pytest.fixture(autouse=True)
def _no_leftover_mounts(tmp_path: Path) -> Iterator[None]:
    yield
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        assert str(tmp_path) not in mounts.read(), "the lorax backend must not mount"
