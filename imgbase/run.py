"""The one subprocess runner: logs argv, keeps the tail of stderr in its errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import deque
from typing import TYPE_CHECKING

from .errors import ImgbaseError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path

TAIL_LINES = 15


def _shell(args: list[str]) -> str:
    import shlex  # imports re: not on the path of the update's helper processes

    return shlex.join(args)


def _debug(what: str, args: list[str]) -> None:
    """Log a command at debug level -- when logging is in use at all: the update's helper
    processes (:mod:`imgbase.node.treesync`) start faster without importing it."""
    if (logging := sys.modules.get("logging")) is not None:
        logging.getLogger("imgbase.run").debug("%s: %s", what, _shell(args))


class CommandError(ImgbaseError):
    """A command exited non-zero; carries its argv, status and output tail."""

    def __init__(self, argv: Sequence[str], returncode: int, tail: str, hint: str | None = None):
        self.argv = list(argv)
        self.returncode = returncode
        self.tail = tail
        last = _summary(tail)
        name = os.path.basename(self.argv[0])
        super().__init__(f"{name} failed with exit status {returncode}: {last}", hint=hint)


def _summary(tail: str) -> str:
    """The line of a command's output that says what went wrong: the last one that is not
    an indented continuation (mount's "dmesg(1) may have more information ...").

    >>> _summary("mount: /mnt: special device /dev/x does not exist.\\n       dmesg(1) may")
    'mount: /mnt: special device /dev/x does not exist.'
    >>> _summary("")
    'no output'
    """
    lines = [line for line in tail.splitlines() if line.strip()]
    return next((ln for ln in reversed(lines) if not ln[0].isspace()),
                lines[-1].strip() if lines else "no output")


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
    errors: str = "strict",
) -> subprocess.CompletedProcess[str]:
    """Run a short command, capturing stdout and stderr as text.

    errors: how text that is not in the locale's encoding is handled, both ways
    ("surrogateescape" passes file names through as they are)."""
    args = [os.fspath(a) for a in argv]
    _debug("run", args)
    try:
        proc = subprocess.run(
            args, env=_env(env), cwd=cwd, input=input, capture_output=True, text=True,
            errors=errors,
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
    _debug("stream", args)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    out = open(logfile, "a", encoding="utf-8") if logfile else None  # noqa: SIM115
    try:
        if out:
            out.write(f"$ {_shell(args)}\n")
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
