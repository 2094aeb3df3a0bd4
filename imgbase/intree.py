"""Paths inside a tree that never lead out of it.

A tree here is an image being composed, a new layer's /etc or a base being synced: its
symlinks are data, and an absolute one (Debian's ``var/run -> /run``) names a path of the
tree, not of the host that works on it. Three tools, for three needs:

* :func:`parts`: a relative path from a listing or a spec, checked -- not absolute, no
  ``..``, no NUL -- and split into its components (a newline is a file name's right:
  a list of paths that must not hold one says so itself);
* :class:`Dirs`: directories of a tree opened one component at a time with
  ``O_NOFOLLOW``, each once; a symlink on the way is refused (:class:`NotInside`), so
  what is written relative to them stays in the tree even when the tree changes meanwhile;
* :func:`resolve`: a directory with every symlink on its way resolved *relative to the
  tree's root*, as a chroot of it would; a symlink that climbs above the root is refused.

>>> parts("etc/./ssh//sshd_config")
['etc', 'ssh', 'sshd_config']
>>> parts("../etc/shadow")
Traceback (most recent call last):
...
imgbase.intree.NotInside: '../etc/shadow' leads out of its tree (a '..' component)

Light imports: the update's helper processes (etcmerge, treesync) use it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import ImgbaseError

#: as the kernel: more symlinks than this on one path is a loop
MAX_LINKS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class NotInside(ImgbaseError):
    """A path that would lead out of its tree, or through a symlink where none may be."""


def parts(rel: str) -> list[str]:
    """The components of a path relative to a tree; refuses one that could leave it."""
    if not rel or rel.startswith("/"):
        raise NotInside(f"{rel!r} is not a path relative to its tree")
    if "\0" in rel:
        raise NotInside(f"{rel!r} has a NUL")
    comps = [c for c in rel.split("/") if c not in ("", ".")]
    if ".." in comps:
        raise NotInside(f"{rel!r} leads out of its tree (a '..' component)")
    return comps


class Dirs:
    """A tree's directories, opened without following a symlink, each once.

    ``get("a/b")`` is an fd of ``<root>/a/b`` reached through real directories only;
    ``create=True`` makes the missing ones. Close with :meth:`close` (or ``with``).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = os.fspath(root)
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except OSError as exc:
            raise NotInside(f"{self.root} is not a directory (or is a symlink): "
                            f"{exc.strerror}") from exc
        self.fds: dict[str, int] = {"": fd}

    def __enter__(self) -> Dirs:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def get(self, reldir: str, create: bool = False) -> int:
        key = "/".join(parts(reldir)) if reldir not in ("", ".") else ""
        if key in self.fds:
            return self.fds[key]
        parent, _, name = key.rpartition("/")
        pfd = self.get(parent, create)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, 0o755, dir_fd=pfd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError as exc:  # ELOOP: a symlink; ENOTDIR: not a directory
            raise NotInside(f"{os.path.join(self.root, key)} is not a directory of the tree "
                            f"({exc.strerror})",
                            hint="nothing is written through a symlink") from exc
        self.fds[key] = fd
        return fd

    def forget(self, rel: str) -> None:
        """Drop rel and what is below it (removed or replaced: its fds are stale)."""
        key = "/".join(parts(rel))
        for k in [k for k in self.fds if k == key or k.startswith(key + "/")]:
            os.close(self.fds.pop(k))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def resolve(root: str | Path, rel: str, *, create: bool = False, mode: int = 0o755) -> Path:
    """``root/rel`` as a real directory path: every symlink on the way resolved relative
    to root as a chroot of root would, and one that climbs above root refused
    (:class:`NotInside`). ``create=True`` makes the missing directories (with ``mode``);
    without, a missing one is FileNotFoundError. A file on the way: NotADirectoryError.

    The tree must not be changed by someone else meanwhile (a compose's own tree): the
    result is a path, checked component by component, not a handle.
    """
    done: list[str] = []
    todo = parts(rel)[::-1] if rel not in ("", ".") else []
    links = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":  # only from a symlink's target
            if not done:
                raise NotInside(f"{rel!r} in {root}: a symlink on the way climbs above the "
                                "tree's root")
            done.pop()
            continue
        path = os.path.join(root, *done, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(path, mode)
            st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise NotInside(f"{rel!r} in {root}: too many symlinks (a loop)")
            target = os.readlink(path)
            if target.startswith("/"):
                done = []
            todo.extend(target.split("/")[::-1])
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        done.append(name)
    return Path(root, *done)


def inside(root: str | Path, rel: str, *, create: bool = False) -> Path:
    """The path of rel in root with its parent :func:`resolve`\\ d: the last component
    is not followed (a caller replaces it, or reads it with ``O_NOFOLLOW``)."""
    comps = parts(rel)
    return resolve(root, "/".join(comps[:-1]), create=create) / comps[-1]
