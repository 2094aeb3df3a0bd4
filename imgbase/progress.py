"""Progress events: a live status line on a terminal, or JSON lines for machines.

Every event also goes to the log file (when one is open), so a CI log and a
developer's terminal tell the same story.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class Progress:
    def __init__(self, *, json_lines: bool = False, stream: IO[str] | None = None) -> None:
        self.json_lines = json_lines
        self.stream = stream or sys.stdout
        self.tty = (not json_lines) and self.stream.isatty()
        self.t0 = time.monotonic()
        self.step_name = ""
        self._log: IO[str] | None = None
        self._status_len = 0

    # -- log file -------------------------------------------------------
    def open_log(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def close_log(self) -> None:
        if self._log:
            self._log.close()
            self._log = None

    # -- events ---------------------------------------------------------
    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, "elapsed": self.elapsed(), **fields}
        line = json.dumps(record, sort_keys=True, default=str)
        if self._log:
            self._log.write(line + "\n")
            self._log.flush()
        if self.json_lines:
            self.stream.write(line + "\n")
            self.stream.flush()
        elif event in ("step-done", "result", "warning", "info"):
            self._print_human(event, fields)

    def status(self, text: str) -> None:
        """A transient status line (terminal only): e.g. package counts."""
        if not self.tty:
            return
        line = f"[{self.elapsed():7.1f}s] {self.step_name}: {text}"[:110]
        self.stream.write("\r" + line.ljust(self._status_len))
        self.stream.flush()
        self._status_len = len(line)

    def _clear_status(self) -> None:
        if self.tty and self._status_len:
            self.stream.write("\r" + " " * self._status_len + "\r")
            self._status_len = 0

    def _print_human(self, event: str, fields: dict[str, Any]) -> None:
        self._clear_status()
        if event == "step-done":
            detail = f"  {fields['detail']}" if fields.get("detail") else ""
            step, secs = fields["step"], fields["seconds"]
            text = f"[{self.elapsed():7.1f}s] {step:<14} {secs:6.1f}s{detail}"
        elif event == "result":
            text = "\n".join(f"{k}: {v}" for k, v in fields.items())
        else:
            text = f"{event}: {fields.get('message', '')}"
        self.stream.write(text + "\n")
        self.stream.flush()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a step; the yielded dict may carry a 'detail' shown when it is done."""
        self.step_name = name
        info: dict[str, Any] = {}
        start = time.monotonic()
        self.emit("step-start", step=name)
        self.status("...")
        yield info
        self.emit("step-done", step=name, seconds=round(time.monotonic() - start, 2), **info)
