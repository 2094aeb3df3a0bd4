"""The rpm database of a composed tree: where it is, and what it says is installed.

Shared by the rpm backends (dnf, lorax, osbuild-composer), so every manifest reports
packages the same way.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ImgbaseError
from ..run import run
from .backend import Package

QUERY_FORMAT = "%{NAME}\\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\t%{ARCH}\\n"

#: where rpm keeps its database, relative to the root: Fedora >= 36, then RHEL <= 9
RPM_DB_DIRS = ("usr/lib/sysimage/rpm", "var/lib/rpm")
#: package state to keep out of a node's shared /var (see postprocess.move_package_db)
RPM_DB_PATHS = ("var/lib/rpm", "var/lib/dnf")


def rpm_db_dir(tree: Path) -> str:
    """The tree's rpm database directory (never through a symlink, which could leave it)."""
    for rel in RPM_DB_DIRS:
        path = tree / rel
        if path.is_dir() and not path.is_symlink():
            return rel
    raise ImgbaseError(f"no rpm database in {tree} (looked in {', '.join(RPM_DB_DIRS)})",
                       hint="was the tree installed by dnf or anaconda?")


def rpm_packages(tree: Path) -> list[Package]:
    """Installed rpm packages, by name, as the dnf backend reports them.

    ``--dbpath`` is explicit: the host's rpm macros (Debian's: ~/.rpmdb) must not
    decide where the tree's database is.
    """
    db = rpm_db_dir(tree)
    out = run(["rpm", f"--root={tree}", f"--dbpath=/{db}", "-qa",
               f"--queryformat={QUERY_FORMAT}"]).stdout
    _settle_rpmdb(tree / db)
    packages = []
    for line in out.splitlines():
        name, version, arch = line.split("\t")
        if name != "gpg-pubkey":  # imported signing keys, not packages
            packages.append(Package(name, version, arch))
    return sorted(packages, key=lambda p: (p.name, p.architecture))


def _settle_rpmdb(db: Path) -> None:
    """The query leaves sqlite side files; drop them once the write-ahead log is empty."""
    wal = db / "rpmdb.sqlite-wal"
    if wal.is_file() and wal.stat().st_size == 0:
        wal.unlink()
        (db / "rpmdb.sqlite-shm").unlink(missing_ok=True)
