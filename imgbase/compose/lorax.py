"""The lorax backend: Fedora/RHEL trees from ``livemedia-creator --make-pxe-live --no-virt``.

livemedia-creator (package lorax; Fedora, RHEL and CentOS Stream only, not available
on Debian) installs the build kickstart with anaconda into an ext4 filesystem image
and packs that image, as ``LiveOS/rootfs.img``, into ``live-rootfs.squashfs.img`` in
its ``--resultdir`` (next to the kernel, a live initramfs and ``PXE_CONFIG``). This
backend unwraps that result into the tree the shared pipeline continues with, without
mounting anything (the composing host need not have loop devices or device-mapper):

    unsquashfs LiveOS/rootfs.img -> debugfs ``rdump`` of the ext4 image -> fix-ups

``rdump`` alone would lose setuid/setgid bits (it chowns after chmod), extended
attributes (file capabilities, SELinux labels, ACLs), hard links, symlink owners and
times, and FIFOs; a listing of the image (``ls -p``, one debugfs run per directory
level), its extended attributes (``ea_list``/``ea_get``) and ``stat`` put them back.
Device nodes and sockets cannot be extracted this way and are refused by name.

The package list comes from the image's rpm database (``rpm --root``), shared with
the osbuild-composer backend. Contract-tested on Debian: docs/backends-fedora.md.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImgbaseError, die
from ..image import squashfs
from ..image.spec import ImageSpec
from ..run import CommandError, run, stream
from .backend import BuildContext, ComposerBackend, Package
from .chroot import remove_tree
from .rpmdb import RPM_DB_PATHS, rpm_packages

LMC = "livemedia-creator"
LIVE_IMAGE = "live-rootfs.squashfs.img"  # livemedia-creator's name (pylorax creator.py)
ROOTFS_IMG = "LiveOS/rootfs.img"
NOT_ON_DEBIAN = ("livemedia-creator not found: lorax is not available on Debian "
                 "(contract-tested only there); compose on Fedora, RHEL or CentOS Stream "
                 "with lorax and anaconda installed")
_LMC_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+: ")
LOG_TAIL_LINES = 200


@dataclass(frozen=True)
class LmcJob:
    """One livemedia-creator run; every path lies in the compose's work directory."""

    kickstart: Path
    resultdir: Path  # must not exist: livemedia-creator refuses an existing one
    tmpdir: Path
    logfile: Path  # anaconda's logs land in <logfile's directory>/anaconda/
    project: str
    releasever: str

    def argv(self) -> list[str]:
        return [
            LMC, "--make-pxe-live", "--no-virt",
            "--ks", str(self.kickstart),
            "--resultdir", str(self.resultdir),
            "--tmp", str(self.tmpdir),
            "--logfile", str(self.logfile),
            "--project", self.project,
            "--releasever", self.releasever,
        ]


class LoraxBackend(ComposerBackend):
    name = "lorax"
    summary = ("Fedora/RHEL: a build kickstart through lorax livemedia-creator "
               "--make-pxe-live --no-virt (contract-tested)")
    tools = {LMC: "lorax", "unsquashfs": "squashfs-tools", "debugfs": "e2fsprogs",
             "rpm": "rpm"}
    #: apt has no lorax: without livemedia-creator, say why instead of "apt-get install lorax"
    runs_here = None if shutil.which(LMC) else NOT_ON_DEBIAN
    applies_layers = True  # the build kickstart's %post applies them, once

    def check_image(self, image: ImageSpec) -> None:
        self.kickstart(image)  # the renderer refuses what a kickstart cannot express

    def kickstart(self, image: ImageSpec) -> str:
        from .kickstart import render_build_kickstart

        return render_build_kickstart(image)

    def job(self, ctx: BuildContext) -> LmcJob:
        base = ctx.workdir / "lorax"
        return LmcJob(kickstart=base / "build.ks", resultdir=base / "result",
                      tmpdir=base / "tmp", logfile=base / "logs" / "livemedia.log",
                      project=ctx.image.name, releasever=ctx.image.suite)

    def build_tree(self, ctx: BuildContext, tree: Path) -> None:
        if shutil.which(LMC) is None:
            die(NOT_ON_DEBIAN, hint="choose another backend: imgbase compose --list-backends")
        job = self.job(ctx)
        job.tmpdir.mkdir(parents=True)
        job.logfile.parent.mkdir(parents=True)
        job.kickstart.write_text(self.kickstart(ctx.image))
        with open(ctx.logfile, "a", encoding="utf-8") as log:
            log.write(f"# build kickstart {job.kickstart}:\n{job.kickstart.read_text()}\n")
        try:
            stream(job.argv(), on_line=_status_line(ctx), logfile=ctx.logfile, env=ctx.env)
        except CommandError as exc:
            _append_logs(job.logfile.parent, ctx.logfile)
            exc.hint = f"see the build log {ctx.logfile} (anaconda's logs are appended to it)"
            raise
        live = job.resultdir / LIVE_IMAGE
        if not live.is_file():
            found = sorted(p.name for p in job.resultdir.glob("*"))
            raise ImgbaseError(
                f"livemedia-creator succeeded but left no {LIVE_IMAGE} in {job.resultdir} "
                f"(found: {', '.join(found) or 'nothing'})",
                hint="a lorax too old or too new for --make-pxe-live? see the build log")
        unwrap_live_image(live, tree, ctx.workdir / "lorax" / "unwrap")
        remove_tree(job.resultdir)  # the ext4 and squashfs copies of the tree

    def installed_packages(self, tree: Path) -> list[Package]:
        return rpm_packages(tree)

    def package_db_paths(self) -> tuple[str, ...]:
        return RPM_DB_PATHS


def _status_line(ctx: BuildContext) -> Callable[[str], None]:
    def on_line(line: str) -> None:
        text = _LMC_STAMP.sub("", line).strip()
        if text:
            ctx.progress.status(text)

    return on_line


def _append_logs(log_dir: Path, logfile: Path) -> None:
    """The tails of livemedia-creator's and anaconda's logs, before the work dir goes."""
    with open(logfile, "a", encoding="utf-8") as out:
        for path in sorted(log_dir.rglob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            out.write(f"# last {len(lines)} lines of {path.relative_to(log_dir)}:\n")
            out.write("\n".join(lines) + "\n")


# -- unwrapping the live image --------------------------------------------------

def unwrap_live_image(live: Path, tree: Path, scratch: Path) -> None:
    """live-rootfs.squashfs.img -> LiveOS/rootfs.img (ext4) -> the files in ``tree``."""
    remove_tree(scratch)
    scratch.mkdir(parents=True)
    try:
        squashfs.unpack(live, scratch / "squashfs-root", ROOTFS_IMG)
        rootfs = scratch / "squashfs-root" / ROOTFS_IMG
        if not rootfs.is_file():
            raise ImgbaseError(f"{live.name} has no {ROOTFS_IMG}",
                               hint="is it a livemedia-creator --make-pxe-live result?")
        extract_ext4(rootfs, tree, scratch / "xattrs")
    finally:
        remove_tree(scratch)


@dataclass(frozen=True)
class Ext4Entry:
    """One directory entry of an ext4 image, as ``debugfs ls -p`` lists it."""

    path: str  # relative to the image's root
    inode: int
    mode: int
    uid: int
    gid: int


_LS_P = re.compile(r"^/(\d+)/(\d+)/(\d+)/(\d+)/(.*)/(\d*)/$")


def extract_ext4(image: Path, tree: Path, scratch: Path) -> None:
    """Every file of an ext4 image into ``tree`` with its metadata, without mounting."""
    if '"' in str(tree):
        die(f"cannot extract into {tree}: debugfs cannot quote a path with '\"'")
    entries = [e for e in list_ext4(image) if e.path != "lost+found"]
    tree.mkdir(parents=True, exist_ok=True)
    if any(tree.iterdir()):
        raise ImgbaseError(f"cannot extract {image.name} into {tree}: it is not empty")
    _debugfs(image, [f'rdump / "{tree}"'])
    lost = tree / "lost+found"
    if lost.is_dir() and not any(lost.iterdir()):
        lost.rmdir()
    _special_files(tree, entries)
    _hard_links(tree, entries)
    _owners_and_modes(tree, entries)
    _xattrs(image, tree, entries, scratch)
    _times(image, tree, entries)  # last: the fix-ups above touch directories


def list_ext4(image: Path) -> list[Ext4Entry]:
    """The root (path "") and every entry below it, breadth first: a debugfs run per level."""
    entries: list[Ext4Entry] = []
    level: list[tuple[int, str]] = [(2, "")]
    while level:
        blocks = _debugfs(image, [f"ls -p <{ino}>" for ino, _ in level])
        following: list[tuple[int, str]] = []
        for (_, parent), lines in zip(level, blocks, strict=True):
            for line in lines:
                m = _LS_P.match(line)
                if not m:
                    raise ImgbaseError(f"{image.name}: cannot read debugfs listing {line!r}",
                                       hint="a file name with a newline?")
                name = m[5]
                if name == "." and not parent:  # the root directory itself
                    entries.append(Ext4Entry("", int(m[1]), int(m[2], 8), int(m[3]), int(m[4])))
                if name in (".", "..") or m[1] == "0":  # inode 0: an unused slot
                    continue
                path = f"{parent}/{name}" if parent else name
                entry = Ext4Entry(path, int(m[1]), int(m[2], 8), int(m[3]), int(m[4]))
                entries.append(entry)
                if stat.S_ISDIR(entry.mode):
                    following.append((entry.inode, path))
        level = following
    return entries


def _debugfs(image: Path, commands: Sequence[str]) -> list[list[str]]:
    """Run debugfs commands on an image (read-only); each command's output lines.

    debugfs exits 0 even when a command fails, so any message on stderr other than its
    version banner is an error.
    """
    try:
        proc = run(["debugfs", "-f", "-", str(image)], input="\n".join(commands) + "\n")
    except UnicodeDecodeError as exc:
        raise ImgbaseError(f"{image.name}: a file name that is not UTF-8",
                           hint="the image's files must have UTF-8 names") from exc
    errors = [line for line in proc.stderr.splitlines()
              if line.strip() and not line.startswith("debugfs ")]
    if errors:
        raise ImgbaseError(f"debugfs on {image.name}: {errors[0]}",
                           hint=f"{len(errors)} error(s); is {image} an ext4 image?")
    blocks: list[list[str]] = []
    for line in proc.stdout.splitlines():
        if line.startswith("debugfs: "):
            blocks.append([])
        elif blocks and line.strip():
            blocks[-1].append(line)
    if len(blocks) != len(commands):
        raise ImgbaseError(f"debugfs on {image.name}: {len(blocks)} answers to "
                           f"{len(commands)} commands")
    return blocks


def _special_files(tree: Path, entries: list[Ext4Entry]) -> None:
    """rdump skips them: FIFOs are made again, device nodes and sockets refused."""
    for e in entries:
        if stat.S_ISFIFO(e.mode):
            os.mkfifo(tree / e.path, stat.S_IMODE(e.mode))
        elif stat.S_ISCHR(e.mode) or stat.S_ISBLK(e.mode) or stat.S_ISSOCK(e.mode):
            raise ImgbaseError(
                f"the live root file system has a device node or socket /{e.path}, "
                "which cannot be extracted without mounting it",
                hint="remove it in the kickstart's %post (udev makes device nodes at boot)")


def _hard_links(tree: Path, entries: list[Ext4Entry]) -> None:
    """rdump writes each name of a hard-linked file as a copy; link them again."""
    first: dict[int, str] = {}
    for e in entries:
        if stat.S_ISDIR(e.mode):
            continue
        if e.inode in first:
            target = tree / e.path
            target.unlink()
            os.link(tree / first[e.inode], target)
        else:
            first[e.inode] = e.path


def _owners_and_modes(tree: Path, entries: list[Ext4Entry]) -> None:
    """Owner first, then mode: a chown clears setuid/setgid (what rdump gets wrong)."""
    root = os.geteuid() == 0
    for e in entries:
        path = tree / e.path
        st = os.lstat(path)
        if root and (st.st_uid, st.st_gid) != (e.uid, e.gid):
            os.lchown(path, e.uid, e.gid)
        if not stat.S_ISLNK(e.mode) and stat.S_IMODE(st.st_mode) != stat.S_IMODE(e.mode):
            os.chmod(path, stat.S_IMODE(e.mode))


_EA_NAME = re.compile(r"^  ([^\s=]+)[ =]")


def _xattrs(image: Path, tree: Path, entries: list[Ext4Entry], scratch: Path) -> None:
    """Extended attributes (capabilities, SELinux labels, ACLs): rdump drops them."""
    by_inode: dict[int, str] = {2: ""}
    for e in entries:
        by_inode.setdefault(e.inode, e.path)
    inodes = sorted(by_inode)
    listed = _debugfs(image, [f"ea_list <{ino}>" for ino in inodes])
    wanted = [(ino, m[1]) for ino, lines in zip(inodes, listed, strict=True)
              for m in map(_EA_NAME.match, lines) if m and m[1] != "system.data"]
    if not wanted:
        return
    scratch.mkdir(parents=True, exist_ok=True)
    _debugfs(image, [f'ea_get -f "{scratch}/{i}" <{ino}> {name}'
                     for i, (ino, name) in enumerate(wanted)])
    for i, (ino, name) in enumerate(wanted):
        path = tree / by_inode[ino]
        try:
            os.setxattr(path, name, (scratch / str(i)).read_bytes(), follow_symlinks=False)
        except OSError as exc:
            raise ImgbaseError(f"cannot set extended attribute {name} on /{by_inode[ino]}: "
                               f"{exc.strerror}",
                               hint=f"does the file system of {tree} support it?") from exc


_MTIME = re.compile(r"^\s*mtime: 0x([0-9a-f]+)")


def _times(image: Path, tree: Path, entries: list[Ext4Entry]) -> None:
    """Modification times of what rdump leaves at "now": directories, symlinks, FIFOs."""
    todo = [e for e in entries if not stat.S_ISREG(e.mode)]
    for e, lines in zip(todo, _debugfs(image, [f"stat <{e.inode}>" for e in todo]),
                        strict=True):
        m = next(filter(None, map(_MTIME.match, lines)), None)
        if m is None:
            raise ImgbaseError(f"debugfs on {image.name}: no mtime for /{e.path}")
        mtime = int(m[1], 16)
        os.utime(tree / e.path, (mtime, mtime), follow_symlinks=False)
