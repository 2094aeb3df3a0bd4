"""The one subprocess runner: logs argv, keeps the tail of stderr in its errors."""

from __future__ import annotations

import collections
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .errors import ImgbaseError

log = logging.getLogger("imgbase.run")

TAIL_LINES = 15


class CommandError(ImgbaseError):
    """A command exited non-zero; carries its argv, status and output tail."""

    def __init__(self, argv: Sequence[str], returncode: int, tail: str, hint: str | None = None):
        self.argv = list(argv)
        self.returncode = returncode
        self.tail = tail
        last = tail.strip().splitlines()[-1] if tail.strip() else "no output"
        super().__init__(
            f"{Path(self.argv[0]).name} failed with exit status {returncode}: {last}", hint=hint
        )


def _env(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    if not extra:
        return None
    env = dict(os.environ)
    env.update(extra)
    return env


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a short command, capturing stdout and stderr as text."""
    args = [os.fspath(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args, env=_env(env), cwd=cwd, input=input, capture_output=True, text=True
        )
    except FileNotFoundError as exc:
        raise ImgbaseError(
            f"{args[0]} is not installed", hint="run 'make setup' to install the dependencies"
        ) from exc
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-TAIL_LINES:])
        raise CommandError(args, proc.returncode, tail)
    return proc


def stream(
    argv: Sequence[str | os.PathLike[str]],
    *,
    on_line: Callable[[str], None] | None = None,
    logfile: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run a long command, feeding each output line (stdout+stderr) to on_line and the log.

    On Ctrl-C or any error in the caller's callback, the child's process group is
    terminated and waited for before the exception propagates.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("stream: %s", shlex.join(args))
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    out = open(logfile, "a", encoding="utf-8") if logfile else None  # noqa: SIM115
    try:
        if out:
            out.write(f"$ {shlex.join(args)}\n")
            out.flush()
        try:
            proc = subprocess.Popen(
                args,
                env=_env(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise ImgbaseError(
                f"{args[0]} is not installed", hint="run 'make setup' to install the dependencies"
            ) from exc
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                if out:
                    out.write(line + "\n")
                if on_line:
                    on_line(line)
            returncode = proc.wait()
        except BaseException:
            _terminate(proc)
            raise
    finally:
        if out:
            out.close()
    if returncode != 0:
        raise CommandError(args, returncode, "\n".join(tail))


def _terminate(proc: subprocess.Popen[str], grace: float = 30.0) -> None:
    """Stop a child and its process group: SIGTERM, then SIGKILL after a grace period."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
