"""grubenv: GRUB's 1024-byte environment block, read and written atomically.

GRUB's ``save_env`` rewrites the block in place, so the file must stay exactly
1024 bytes; imgbase writes a whole new block (write, fsync, rename).

>>> block = render({"saved_entry": "n-1-1+2", "imgbase_tries": "3"})
>>> len(block), block.splitlines()[:3]
(1024, ['# GRUB Environment Block', 'imgbase_tries=3', 'saved_entry=n-1-1+2'])
>>> parse(block) == {"saved_entry": "n-1-1+2", "imgbase_tries": "3"}
True
"""

from __future__ import annotations

from pathlib import Path

from ..errors import die

SIZE = 1024
HEADER = "# GRUB Environment Block\n"


def parse(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key] = value
    return env


def read(path: Path) -> dict[str, str]:
    """Variables of a grubenv block ({} if there is none)."""
    try:
        return parse(path.read_text(errors="replace"))
    except OSError:
        return {}


def render(env: dict[str, str]) -> str:
    """A 1024-byte block; variables sorted, empty values dropped."""
    body = HEADER + "".join(f"{k}={v}\n" for k, v in sorted(env.items()) if v != "")
    if len(body.encode()) > SIZE:
        die(f"the GRUB environment would be {len(body.encode())} bytes, over {SIZE}",
            hint="fewer or shorter variables in grubenv")
    for k, v in env.items():
        if "\n" in k + v or "=" in k:
            die(f"grubenv variable {k!r} = {v!r} cannot be stored", hint="no newlines")
    return body + "#" * (SIZE - len(body.encode()))
