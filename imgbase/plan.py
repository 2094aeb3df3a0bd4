"""Plan, then apply: the steps of a state-changing command and their journaled executor.

A planner is a pure function from facts to a :class:`Plan`; ``--dry-run`` prints
it and ``--json`` emits it. :func:`execute` runs the steps in order through the
one runner and journals each one (fsync'd JSON lines), so that after a crash
``imgbase recover`` can say which operation was cut short, and where.

>>> p = Plan("layer-add", (Step("snap", ("lvcreate", "-s", "vg/a")),
...                        Step("cfg", write=("/boot/x.cfg", "x\\n"))))
>>> print(p.describe())
layer-add:
  1. snap: lvcreate -s vg/a
  2. cfg: write /boot/x.cfg
>>> json.loads(p.to_json())["steps"][1]["write"]
['/boot/x.cfg', 'x\\n']
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ImgbaseError, InputError
from .progress import Progress
from .run import run

JOURNAL = Path("/var/lib/imgbase/journal.jsonl")
LOCK = Path("/run/imgbase/lock")
# Test hooks. IMGBASE_CRASH_AFTER_STEP=<step>: end the process (as a crash would) right
# after that step. IMGBASE_POWER_CUT=after:<step> or during:<step>:<seconds>: reset the
# machine at once through /proc/sysrq-trigger -- no sync, no unmount, no shutdown: what a
# power cut does -- right after the step, or that many seconds into it.
CRASH_AFTER_ENV = "IMGBASE_CRASH_AFTER_STEP"
POWER_CUT_ENV = "IMGBASE_POWER_CUT"
SYSRQ = Path("/proc/sysrq-trigger")


def power_cut() -> None:
    SYSRQ.write_text("b")  # immediate reset; nothing after this line runs
    os._exit(137)


def power_cut_point(value: str | None) -> tuple[str, str, float] | None:
    """Parse IMGBASE_POWER_CUT.

    >>> power_cut_point("after:base-sync"), power_cut_point("during:base-sync:2.5")
    (('after', 'base-sync', 0.0), ('during', 'base-sync', 2.5))
    >>> power_cut_point(None), power_cut_point("whenever")
    (None, None)
    """
    if not value:
        return None
    when, _, rest = value.partition(":")
    if when == "after" and rest:
        return ("after", rest, 0.0)
    step, _, seconds = rest.partition(":")
    if when == "during" and step:
        try:
            return ("during", step, float(seconds or 0))
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class Step:
    """One step: a command to run, or a file to write atomically (path, content)."""

    name: str
    argv: tuple[str, ...] = ()
    write: tuple[str, str] | None = None
    note: str = ""

    def describe(self) -> str:
        if self.write:
            return f"{self.name}: write {self.write[0]}"
        return f"{self.name}: {shlex.join(self.argv)}"


@dataclass(frozen=True)
class Plan:
    operation: str
    steps: tuple[Step, ...]
    failure_hint: str = "run imgbase recover to clean up"
    # what recover needs to finish the operation, journaled with it (e.g. the new layer)
    meta: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        lines = [f"{self.operation}:"]
        lines += [f"  {i}. {s.describe()}" for i, s in enumerate(self.steps, 1)]
        if not self.steps:
            lines.append("  nothing to do")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"operation": self.operation,
                           "steps": [asdict(s) for s in self.steps]}, indent=2)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable: a file created, renamed or removed in it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, content: str) -> None:
    """Write a file so that a crash leaves either the old or the new content.

    A write that fails (a full or failing disk: ENOSPC, EIO) leaves the old file and no
    temporary one, and raises an ImgbaseError naming the file and the reason. A temporary
    file left by a crash is removed first, never written through (it may be a symlink)."""
    tmp = path.with_name(f".{path.name}.imgbase-tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ImgbaseError(f"cannot write {path}: {exc.strerror or exc}",
                           hint="free space on that file system (df -h)") from None


class Journal:
    """Append-only JSON lines, fsync'd; removed when the operation completes. Creating and
    removing the file fsync its directory, so a power cut cannot lose or revive it."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def record(self, **fields: Any) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **fields}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if new:
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise ImgbaseError(f"cannot write the journal {self.path}: "
                               f"{exc.strerror or exc}",
                               hint="free space on /var (df -h /var), then run imgbase recover"
                               ) from None

    def close(self) -> None:
        if self.path is not None:
            try:
                self.path.unlink(missing_ok=True)
                fsync_dir(self.path.parent)
            except OSError as exc:
                raise ImgbaseError(f"cannot remove the journal {self.path}: "
                                   f"{exc.strerror or exc}",
                                   hint="the operation is done; imgbase recover removes it"
                                   ) from None


@contextlib.contextmanager
def locked(path: Path = LOCK) -> Iterator[None]:
    """One state-changing imgbase command at a time (a second is refused, not queued)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise InputError(f"another imgbase operation is running (pid {holder})",
                             hint="wait for it to finish; imgbase recover if it was killed"
                             ) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)


def read_journal(path: Path = JOURNAL) -> list[dict[str, Any]]:
    """The records of an operation that did not complete ([] if none)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line: the crash came mid-write
    return records


def execute(plan: Plan, progress: Progress, journal: Path | None = JOURNAL) -> None:
    """Run the plan's steps in order; the first failure stops it with a hint.

    On a node, an operation that was cut short (its journal is still there) must be dealt
    with first: a new one would bury the record `imgbase recover` works from. Install and
    layout --init keep journals of their own, and running them again is how they start
    over: their old journal is dropped."""
    if journal is not None and (left := read_journal(journal)):
        if journal != JOURNAL:
            journal.unlink()
        else:
            raise InputError(f"an interrupted operation is on record ({interrupted(left)})",
                             hint="run imgbase recover first")
    j = Journal(journal)
    j.record(event="begin", operation=plan.operation, steps=[s.name for s in plan.steps],
             **dict(plan.meta))
    crash_after = os.environ.get(CRASH_AFTER_ENV)
    cut = power_cut_point(os.environ.get(POWER_CUT_ENV))
    for step in plan.steps:
        with progress.step(step.name) as info:
            j.record(event="start", step=step.name)
            timer = None
            if cut and cut[0] == "during" and cut[1] == step.name:
                timer = threading.Timer(cut[2], power_cut)
                timer.daemon = True
                timer.start()
            try:
                if step.write:
                    write_atomic(Path(step.write[0]), step.write[1])
                elif out := run(step.argv).stdout.strip():
                    info["detail"] = out.splitlines()[-1][:200]  # e.g. what a sync did
            except ImgbaseError as exc:
                with contextlib.suppress(ImgbaseError):  # a full /var: the step's error counts
                    j.record(event="failed", step=step.name,
                             error=" ".join(exc.message.split()))
                raise ImgbaseError(f"{plan.operation}: step {step.name!r} failed: "
                                   f"{exc.message}",
                                   hint="; then ".join(h for h in (exc.hint, plan.failure_hint)
                                                       if h)) from exc
            if timer is not None:  # the step was quicker than the cut: cut at its end
                timer.cancel()
                power_cut()
            j.record(event="done", step=step.name)
        if crash_after == step.name:
            os._exit(137)
        if cut and cut[0] == "after" and cut[1] == step.name:
            power_cut()
    j.close()

def interrupted(journal: list[dict[str, Any]]) -> str | None:
    """What the journal says was cut short, e.g. "layer-add, after step layer-mount".

    >>> interrupted([{"event": "begin", "operation": "layer-add"},
    ...              {"event": "start", "step": "a"}, {"event": "done", "step": "a"}])
    'layer-add, after step a'
    >>> interrupted([]) is None
    True
    """
    if not journal:
        return None
    op = journal[0].get("operation", "an operation")
    done = [r["step"] for r in journal if r.get("event") == "done"]
    failed = [r for r in journal if r.get("event") == "failed"]
    if failed:
        return f"{op}, failed at step {failed[-1]['step']}"
    return f"{op}, after step {done[-1]}" if done else f"{op}, before its first step"
