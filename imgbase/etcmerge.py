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
``imgbase/etc-merge.json``).
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def _walk(root: Path) -> set[str]:
    out: set[str] = set()
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in dirnames + filenames:
            out.add(str(rel / name) if str(rel) != "." else name)
    return out


def _same(a: Path, b: Path) -> bool:
    """Same type, mode, owner, and content or link target; both absent counts as same."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return not os.path.lexists(a) and not os.path.lexists(b)
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode) or sa.st_mode != sb.st_mode:
        return False
    if (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
        return False
    if stat.S_ISLNK(sa.st_mode):
        return os.readlink(a) == os.readlink(b)
    if stat.S_ISREG(sa.st_mode):
        return filecmp.cmp(a, b, shallow=False)
    return True


def _put(src: Path, dst: Path) -> None:
    """Make dst what src is (or remove dst if src does not exist)."""
    if os.path.lexists(dst) and not (dst.is_dir() and not dst.is_symlink() and src.is_dir()
                                     and not src.is_symlink()):
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    if not os.path.lexists(src):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir(exist_ok=True)
        shutil.copystat(src, dst)
    else:
        shutil.copy2(src, dst)
    st = os.lstat(src)
    os.lchown(dst, st.st_uid, st.st_gid)


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
    """Merge into target (the new layer's /etc, which starts as the new factory's)."""
    if policy not in POLICIES:
        raise ValueError(policy)
    report = MergeReport()
    paths = sorted(_walk(old_factory) | _walk(old_etc) | _walk(new_factory))
    for rel in paths:
        if rel in SKIP or rel in ACCOUNT_DBS:
            continue
        base, local, new = old_factory / rel, old_etc / rel, new_factory / rel
        if _same(local, base):
            if not _same(new, target / rel):
                _put(new, target / rel)
            if not os.path.lexists(new) and os.path.lexists(base):
                report.removed.append(rel)
            elif not _same(new, base):
                report.taken_new.append(rel)
        elif _same(new, base) or _same(local, new):
            _put(local, target / rel)
            report.kept_local.append(rel)
        else:
            report.conflicts.append(rel)
            _put(local if policy == "keep-local" else new, target / rel)
    for db in ACCOUNT_DBS:
        if (new_factory / db).exists() and (old_etc / db).exists():
            text, added = merge_accounts(
                (old_factory / db).read_text() if (old_factory / db).exists() else "",
                (old_etc / db).read_text(), (new_factory / db).read_text())
            mode = os.lstat(new_factory / db)
            (target / db).write_text(text)
            os.chmod(target / db, stat.S_IMODE(mode.st_mode))
            os.chown(target / db, mode.st_uid, mode.st_gid)
            report.accounts_kept += [f"{db}:{name}" for name in added]
    (target / "imgbase").mkdir(exist_ok=True)
    (target / SKIP[0]).write_text(json.dumps(asdict(report), indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """``python3 -P -m imgbase.etcmerge OLD_FACTORY OLD_ETC NEW_FACTORY TARGET [POLICY]``:
    what an update runs, without the CLI's imports (seconds under emulation)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (4, 5) or (args[4:] and args[4] not in ("keep-local", "take-new")):
        print("usage: python3 -m imgbase.etcmerge OLD_FACTORY OLD_ETC NEW_FACTORY TARGET "
              "[keep-local|take-new]", file=sys.stderr)
        return 2
    policy = args[4] if args[4:] else "keep-local"
    old_factory, old_etc, new_factory, target = (Path(a) for a in args[:4])
    report = merge(old_factory, old_etc, new_factory, target, policy=policy)
    for rel in report.conflicts:
        print(f"conflict: /etc/{rel} ({policy})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
