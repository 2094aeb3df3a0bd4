"""grub on /boot: one static grub.cfg, and one menu entry per layer.

``grub.cfg`` never changes after install: it loads ``grubenv`` (``saved_entry``
is the default layer) and sources ``imgbase-entries.cfg``, which imgbase
rewrites atomically whenever a layer comes or goes. Each layer's kernel and
initrd live in ``/boot/<layer>/``, so removing a layer never touches another's.

>>> text = render_entries({name: entry(name, f"/dev/vg/{name}", "rw")
...                        for name in ("n-1-1+1", "n-1-1+10", "n-1-1+2")})
>>> list(parse_entries(text))
['n-1-1+10', 'n-1-1+2', 'n-1-1+1']
>>> print(parse_entries(text)["n-1-1+1"], end="")
menuentry 'imgbase n-1-1+1' --id 'n-1-1+1' {
  linux /n-1-1+1/vmlinuz root=/dev/vg/n-1-1+1 rw
  initrd /n-1-1+1/initrd.img
}
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import die
from ..plan import Step
from ..storage.layout import layer_key
from . import grubenv

GRUB_DIR = "grub"
ENTRIES = "imgbase-entries.cfg"
GRUBENV = "grubenv"
ENTRY_RE = re.compile(r"^menuentry [^\n]*--id '([^']+)' \{\n.*?^\}\n", re.M | re.S)


MAX_TRIES = 9


def _countdown() -> str:
    """GRUB script has no arithmetic: one branch per count."""
    lines = ['  if [ "${imgbase_tries}" = "0" ]; then\n'
             '    set default="${imgbase_fallback}"\n']
    lines += [f'  elif [ "${{imgbase_tries}}" = "{n}" ]; then\n'
              f"    set imgbase_tries={n - 1}\n    save_env imgbase_tries\n"
              for n in range(1, MAX_TRIES + 1)]
    return "".join(lines) + "  fi\n"


DEFAULT_MENU_TIMEOUT = 2  # seconds, when grubenv has no imgbase_timeout
MENU_TIMEOUT_KEY = "imgbase_timeout"  # seconds GRUB's menu waits; unset: grub.cfg's 2


def menu_timeout_env(seconds: int) -> dict[str, str]:
    """The grubenv variable for a menu timeout, checked.

    >>> menu_timeout_env(0)
    {'imgbase_timeout': '0'}
    """
    if not 0 <= seconds <= 300:
        die(f"menu timeout {seconds} is out of range",
            hint="give 0 (boot the default at once) to 300 seconds")
    return {MENU_TIMEOUT_KEY: str(seconds)}


def grub_cfg(default: str, boot_uuid: str | None = None) -> str:
    """grub.cfg; /boot is found by its filesystem UUID if given, else by label 'boot'.

    The default is grubenv's ``saved_entry``. A one-time ``next_entry`` wins and is
    cleared. Otherwise, while ``imgbase_tries`` is set the default layer is on trial:
    each boot counts it down, and at 0 GRUB boots ``imgbase_fallback`` instead (also
    GRUB's own fallback if the default entry cannot even be loaded). The menu waits 2 s,
    or ``imgbase_timeout`` seconds (``imgbase boot --menu-timeout``).

    >>> cfg = grub_cfg("n-1-1+1")
    >>> 'set imgbase_tries=2' in cfg and 'set default="${imgbase_fallback}"' in cfg
    True
    """
    search = f"--fs-uuid --set=root {boot_uuid}" if boot_uuid else "--label --set=root boot"
    return (
        "# imgbase: written by imgbase; the entries live in imgbase-entries.cfg\n"
        "serial --unit=0 --speed=115200\nterminal_input serial console\n"
        f"terminal_output serial console\nset timeout={DEFAULT_MENU_TIMEOUT}\n"
        "insmod part_gpt\ninsmod part_msdos\ninsmod ext2\n"
        f"search --no-floppy {search}\n"
        "load_env\n"
        'if [ -n "${imgbase_timeout}" ]; then set timeout="${imgbase_timeout}"; fi\n'
        f'set default="{default}"\n'
        'if [ -n "${saved_entry}" ]; then set default="${saved_entry}"; fi\n'
        'if [ -n "${imgbase_fallback}" ]; then set fallback="${imgbase_fallback}"; fi\n'
        'if [ -n "${next_entry}" ]; then\n'
        '  set default="${next_entry}"\n  set next_entry=\n  save_env next_entry\n'
        'elif [ -n "${imgbase_tries}" ]; then\n'
        + _countdown() +
        "fi\n"
        f"source /{GRUB_DIR}/{ENTRIES}\n"
    )


def entry(layer: str, root: str, kargs: str) -> str:
    return (f"menuentry 'imgbase {layer}' --id '{layer}' {{\n"
            f"  linux /{layer}/vmlinuz root={root} {kargs}\n"
            f"  initrd /{layer}/initrd.img\n}}\n")


def parse_entries(text: str) -> dict[str, str]:
    """Menu entries by id, in file order."""
    return {m.group(1): m.group(0) for m in ENTRY_RE.finditer(text)}


def render_entries(entries: dict[str, str]) -> str:
    """All entries, newest layer first."""
    return "".join(entries[k] for k in sorted(entries, key=layer_key, reverse=True))


def unrecognised(text: str) -> str:
    """What of an entries file is not a menu entry imgbase wrote (whitespace aside).

    >>> unrecognised(entry("a+1", "/dev/v/a+1", "rw") + "garbage }\\n")
    'garbage }'
    """
    return ENTRY_RE.sub("", text).strip()


def read_entries(boot: Path) -> dict[str, str]:
    try:
        return parse_entries((boot / GRUB_DIR / ENTRIES).read_text())
    except FileNotFoundError:
        return {}


def kernel_args(block: str) -> str:
    """The kernel arguments after root=... of an entry.

    >>> kernel_args(entry("a+1", "/dev/vg/a+1", "rw quiet"))
    'rw quiet'
    """
    m = re.search(r"^\s*(?:linux \S+|options) root=\S+ ?(.*)$", block, re.M)
    return m.group(1).strip() if m else "rw"


def write_steps(boot: Path, current: dict[str, str], changes: dict[str, str | None]
                ) -> list[Step]:
    """Rewrite the entries file with the changed entries (None: removed)."""
    entries = {k: v for k, v in {**current, **changes}.items() if v is not None}
    return [Step("boot-entries", write=(str(boot / GRUB_DIR / ENTRIES),
                                        render_entries(entries)))]


def read_grubenv(path: Path) -> dict[str, str]:
    """Variables of a grubenv block ({} if there is none)."""
    return grubenv.read(path)
