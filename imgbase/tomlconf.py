"""Typed access to TOML files with file:line in every error: the one reader under the
image and layer specs, imgbase.toml (:mod:`imgbase.config`), agent.toml and kickstart site
parameters. A table's keys are consumed one by one; a key not allowed is an error, as is
a value of the wrong type.

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> _ = (d / "x.toml").write_text("[gc]\\nkeep = 'two'\\n")
>>> src = Source(d / "x.toml")
>>> Table(src, "gc", src.data["gc"], {"keep"}).get("keep", int)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
imgbase.errors.InputError: ...x.toml:2: 'keep' must be int, not str
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, NoReturn

from .errors import die


class Source:
    """A TOML file read once (or its ``text``, already read); ``missing_ok``: a file that
    does not exist reads as empty (a settings file nobody wrote)."""

    def __init__(self, path: Path, *, missing_ok: bool = False,
                 missing_hint: str = "check the path of the image or layer definition",
                 text: str | None = None) -> None:
        self.path = path
        try:
            self.text = path.read_text(encoding="utf-8") if text is None else text
        except FileNotFoundError:
            if not missing_ok:
                die(f"{path}: no such file", hint=missing_hint)
            self.text = ""
        except (OSError, UnicodeDecodeError) as exc:
            die(f"{path}: cannot read: {exc}")
        try:
            self.data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            m = re.search(r"line (\d+)", str(exc))
            where = f"{path}:{m[1]}" if m else str(path)
            die(f"{where}: TOML syntax error: {exc}", hint="see https://toml.io for the syntax")

    def line_of(self, table: str, key: str | None = None) -> int:
        """Best-effort line of ``key`` in ``[table]`` (or of the table header)."""
        lines = self.text.splitlines()
        if not table and key is not None:  # a top-level key, or a section of that name
            header = re.compile(rf"^\s*\[\[?\s*[\"']?{re.escape(key)}[\"']?\s*[\].]")
            for i, line in enumerate(lines):
                if header.match(line):
                    return i + 1
        start = 0
        for i, line in enumerate(lines):
            if re.match(rf"^\s*\[\s*{re.escape(table)}\s*\]", line):
                start = i
                break
        if key is None:
            return start + 1
        pat = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for i in range(start, len(lines)):
            if pat.match(lines[i]):
                return i + 1
        return start + 1

    def fail(self, table: str, key: str | None, message: str,
             hint: str | None = None) -> NoReturn:
        die(f"{self.path}:{self.line_of(table, key)}: {message}", hint=hint)


class Table:
    """One TOML table whose keys are consumed one by one; leftovers are errors."""

    def __init__(self, src: Source, name: str, data: Any, allowed: set[str]) -> None:
        self.src, self.name = src, name
        if not isinstance(data, dict):
            src.fail(name, None, f"[{name}] must be a table")
        self.data: dict[str, Any] = data
        for key in data:
            if key not in allowed:
                if not name:  # the file's top level
                    what = (f"unknown section [{key}]" if isinstance(data[key], dict)
                            else f"unknown key '{key}'")
                    src.fail(name, key, what, hint=f"known: {', '.join(sorted(allowed))}")
                src.fail(
                    name, key, f"unknown key '{key}' in [{name}]",
                    hint=f"allowed keys: {', '.join(sorted(allowed))}",
                )

    def get(self, key: str, typ: type, default: Any = None, *, required: bool = False) -> Any:
        if key not in self.data:
            if required:
                self.src.fail(self.name, None, f"[{self.name}] needs '{key}'")
            return default
        value = self.data[key]
        if typ is int and isinstance(value, bool) or not isinstance(value, typ):
            self.src.fail(
                self.name, key,
                f"'{key}' must be {typ.__name__}, not {type(value).__name__}",
            )
        return value

    def strings(self, key: str, pattern: re.Pattern[str] | None = None,
                what: str = "name", hint: str | None = None) -> tuple[str, ...]:
        values = self.get(key, list, [])
        seen: set[str] = set()
        for v in values:
            if not isinstance(v, str):
                self.src.fail(self.name, key, f"'{key}' must be a list of strings, found {v!r}")
            if pattern and not pattern.fullmatch(v):  # $ alone takes a trailing newline
                self.src.fail(self.name, key, f"'{key}': {v!r} is not a valid {what}",
                              hint=hint)
            if v in seen:
                self.src.fail(self.name, key, f"'{key}': {v!r} is listed twice")
            seen.add(v)
        return tuple(values)
