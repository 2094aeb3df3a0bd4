"""3-way merge of /etc for a new layer: old factory (base), old layer (local), new factory.

Per path (file, symlink or directory; content, mode and link target compared):

* unchanged locally (local == old factory): the new factory's version wins, deletions too;
* unchanged by the image (new factory == old factory): the local version stays;
* both made the same change: kept;
* both changed it differently: a **conflict**; the policy decides (``keep-local``, the
  default, or ``take-new``), and the report lists it.

The account databases (passwd, group, shadow, gshadow) merge by name instead: the new
factory's entries, plus the accounts only the local side has, with their local IDs, so
users the admin made keep their UID/GID across updates.

The merge writes into the new layer's /etc and returns a report (saved there as
``imgbase/etc-merge.json``). It runs outside any chroot, on the running system, so the
trees' symlinks are data: nothing is read through a symlink of an input (a path under
one counts as absent on that side), and nothing is written through one of the target --
every write is relative to a directory fd opened with ``O_NOFOLLOW``
(:class:`imgbase.intree.Dirs`). A local version whose directory the new image made a
symlink (``/etc/x -> /somewhere``) is not written and is reported ``skipped``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import intree

ACCOUNT_DBS = ("passwd", "group", "shadow", "gshadow")
POLICIES = ("keep-local", "take-new")
SKIP = ("imgbase/etc-merge.json",)


@dataclass
class MergeReport:
    taken_new: list[str] = field(default_factory=list)
    kept_local: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    accounts_kept: list[str] = field(default_factory=list)
    #: local versions not written: the new image put a symlink (or a file) where their
    #: directory was, and nothing is written through a symlink
    skipped: list[str] = field(default_factory=list)


def _walk(root: Path) -> set[str]:
    """The paths of a tree reached through real directories (no symlink followed)."""
    out: set[str] = set()
    if not root.is_dir() or root.is_symlink():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in dirnames + filenames:
            out.add(str(rel / name) if str(rel) != "." else name)
    return out


class _Side:
    """One input tree of the merge: a path of it counts only if its walk reached it, so
    a path under a symlink of that tree is absent there, never read through the link."""

    def __init__(self, root: Path) -> None:
        self.root, self.paths = root, _walk(root)

    def lstat(self, rel: str) -> os.stat_result | None:
        return os.lstat(self.root / rel) if rel in self.paths else None

    def read(self, rel: str) -> bytes:
        fd = os.open(self.root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def text(self, rel: str) -> str | None:
        """A regular file's text, None for anything else."""
        st = self.lstat(rel)
        return self.read(rel).decode() if st and stat.S_ISREG(st.st_mode) else None


class _Target:
    """The new layer's /etc, read and written only relative to its directories' fds."""

    def __init__(self, dirs: intree.Dirs) -> None:
        self.dirs = dirs

    def where(self, rel: str, create: bool = False) -> tuple[int, str] | None:
        """(fd of rel's directory, rel's name), None if that directory is not a real one
        (a symlink the new image put there: nothing of it is in this tree)."""
        parent, _, name = rel.rpartition("/")
        try:
            return self.dirs.get(parent, create), name
        except (intree.NotInside, FileNotFoundError):
            return None

    def lstat(self, rel: str) -> os.stat_result | None:
        at = self.where(rel)
        try:
            return os.stat(at[1], dir_fd=at[0], follow_symlinks=False) if at else None
        except FileNotFoundError:
            return None

    def read(self, rel: str) -> bytes:
        at = self.where(rel)
        assert at is not None
        fd = os.open(at[1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=at[0])
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def readlink(self, rel: str) -> str:
        at = self.where(rel)
        assert at is not None
        return os.readlink(at[1], dir_fd=at[0])


def _same(a: _Side | _Target, b: _Side | _Target, rel: str) -> bool:
    """Same type, mode, owner, and content or link target; both absent counts as same."""
    sa, sb = a.lstat(rel), b.lstat(rel)
    if sa is None or sb is None:
        return sa is sb
    if sa.st_mode != sb.st_mode or (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
        return False
    if stat.S_ISLNK(sa.st_mode):
        return _readlink(a, rel) == _readlink(b, rel)
    if stat.S_ISREG(sa.st_mode):
        return sa.st_size == sb.st_size and a.read(rel) == b.read(rel)
    return True


def _readlink(side: _Side | _Target, rel: str) -> str:
    return side.readlink(rel) if isinstance(side, _Target) else os.readlink(side.root / rel)


def _put(src: _Side, target: _Target, rel: str) -> bool:
    """Make target's rel what src's is (or remove it if src has none), writing only
    relative to target's directory fds. False when it cannot be placed: its directory in
    the target is a symlink or a file (the new image's), which is not written through."""
    st = src.lstat(rel)
    at = target.where(rel, create=st is not None)
    if at is None:
        return st is None  # nothing of the target is there to remove
    dfd, name = at
    old = target.lstat(rel)
    both_dirs = (old is not None and st is not None and stat.S_ISDIR(old.st_mode)
                 and stat.S_ISDIR(st.st_mode))
    if old is not None and not both_dirs:
        if stat.S_ISDIR(old.st_mode):
            target.dirs.forget(rel)
            shutil.rmtree(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)
    if st is None:
        return True
    path = src.root / rel
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(path), name, dir_fd=dfd)
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
        return True
    if stat.S_ISDIR(st.st_mode):
        if not both_dirs:
            os.mkdir(name, 0o700, dir_fd=dfd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dfd)
    else:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        _write_all(fd, src.read(rel))
    try:
        os.fchown(fd, st.st_uid, st.st_gid)  # first: a chown clears set-id bits
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        _copy_xattrs(path, fd)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)
    return True


def _copy_xattrs(path: Path, fd: int) -> None:
    for attr in os.listxattr(path, follow_symlinks=False):
        try:
            os.setxattr(fd, attr, os.getxattr(path, attr, follow_symlinks=False))
        except OSError as exc:  # as shutil.copystat: a namespace this fs does not take
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENODATA, errno.EINVAL):
                raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write(target: _Target, rel: str, data: bytes, owner_mode: tuple[int, int, int]) -> None:
    """Replace target's rel (whatever it is) by a file of data: (uid, gid, mode)."""
    at = target.where(rel, create=True)
    if at is None:
        raise intree.NotInside(f"/etc/{rel}: its directory is not one in the new layer",
                               hint="the new image must not make it a symlink")
    dfd, name = at
    old = target.lstat(rel)
    if old is not None and stat.S_ISDIR(old.st_mode):
        target.dirs.forget(rel)
        shutil.rmtree(name, dir_fd=dfd)
    elif old is not None:
        os.unlink(name, dir_fd=dfd)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dfd)
    try:
        _write_all(fd, data)
        os.fchown(fd, owner_mode[0], owner_mode[1])
        os.fchmod(fd, owner_mode[2])
    finally:
        os.close(fd)


def merge_accounts(base: str, local: str, new: str) -> tuple[str, list[str]]:
    """New factory's entries, plus accounts only the local side added (with their IDs).

    >>> merge_accounts("root:*:1\\n", "root:$6$set:1\\nann:x:1001:1001\\n",
    ...                "root:*:2\\nlibvirt:x:120:120\\n")
    ('root:$6$set:1\\nlibvirt:x:120:120\\nann:x:1001:1001\\n', ['ann'])
    """
    def names(text: str) -> dict[str, str]:
        return {line.split(":", 1)[0]: line for line in text.splitlines() if ":" in line}

    old, mine, theirs = names(base), names(local), names(new)
    added = [n for n in mine if n not in old and n not in theirs]

    def pick(name: str, line: str) -> str:
        changed_here = name in mine and name in old and mine[name] != old[name]
        return mine[name] if changed_here else line  # e.g. a root password set locally

    lines = [pick(n, line) for n, line in theirs.items()] + [mine[n] for n in added]
    return "".join(f"{line}\n" for line in lines), added


def merge(old_factory: Path, old_etc: Path, new_factory: Path, target: Path,
          policy: str = "keep-local") -> MergeReport:
    """Merge into target (the new layer's /etc, which starts as the new factory's).

    Nothing is read through a symlink of the three inputs, and nothing written through
    one of the target: a local version whose directory the new image made a symlink is
    reported ``skipped``."""
    if policy not in POLICIES:
        raise ValueError(policy)
    report = MergeReport()
    base_t, local_t, new_t = _Side(old_factory), _Side(old_etc), _Side(new_factory)
    with intree.Dirs(target) as dirs:
        tgt = _Target(dirs)
        _merge_paths(base_t, local_t, new_t, tgt, policy, report)
        _merge_accounts(base_t, local_t, new_t, tgt, report)
        _write(tgt, SKIP[0], (json.dumps(asdict(report), indent=1) + "\n").encode(),
               (os.getuid(), os.getgid(), 0o644))
    return report


def _merge_paths(base: _Side, local: _Side, new: _Side, target: _Target, policy: str,
                 report: MergeReport) -> None:
    for rel in sorted(base.paths | local.paths | new.paths):
        if rel in SKIP or rel in ACCOUNT_DBS:
            continue
        if _same(local, base, rel):
            if not _same(new, target, rel) and not _put(new, target, rel):
                report.skipped.append(rel)
            if new.lstat(rel) is None and base.lstat(rel) is not None:
                report.removed.append(rel)
            elif not _same(new, base, rel):
                report.taken_new.append(rel)
        elif _same(new, base, rel) or _same(local, new, rel):
            (report.kept_local if _put(local, target, rel) else report.skipped).append(rel)
        else:
            report.conflicts.append(rel)
            if not _put(local if policy == "keep-local" else new, target, rel):
                report.skipped.append(rel)


def _merge_accounts(base: _Side, local: _Side, new: _Side, target: _Target,
                    report: MergeReport) -> None:
    for db in ACCOUNT_DBS:
        theirs, mine = new.text(db), local.text(db)
        if theirs is None or mine is None:  # absent, or not a regular file: left as is
            continue
        text, added = merge_accounts(base.text(db) or "", mine, theirs)
        like = new.lstat(db)
        assert like is not None
        _write(target, db, text.encode(), (like.st_uid, like.st_gid, stat.S_IMODE(like.st_mode)))
        report.accounts_kept += [f"{db}:{name}" for name in added]


def main(argv: list[str] | None = None) -> int:
    """``python3 -P -m imgbase.node.etcmerge OLD_FACTORY OLD_ETC NEW_FACTORY TARGET [POLICY]``:
    what an update runs, without the CLI's imports (seconds under emulation)."""
    import sys

    from ..errors import ImgbaseError

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (4, 5) or (args[4:] and args[4] not in ("keep-local", "take-new")):
        print("usage: python3 -m imgbase.node.etcmerge OLD_FACTORY OLD_ETC NEW_FACTORY TARGET "
              "[keep-local|take-new]", file=sys.stderr)
        return 2
    policy = args[4] if args[4:] else "keep-local"
    old_factory, old_etc, new_factory, target = (Path(a) for a in args[:4])
    try:
        report = merge(old_factory, old_etc, new_factory, target, policy=policy)
    except ImgbaseError as exc:
        print(exc.oneline(), file=sys.stderr)
        return exc.exit_code
    for rel in report.conflicts:
        print(f"conflict: /etc/{rel} ({policy})")
    for rel in report.skipped:
        print(f"skipped: /etc/{rel} (its directory is a symlink in the new image)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
