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
from ..image.kargs import UNSAFE, cmdline
from ..image.naming import layer_key
from ..plan import Step
from . import grubenv

GRUB_DIR = "grub"
ENTRIES = "imgbase-entries.cfg"
#: GRUB 2.06's ``fallback`` takes a menu position, not an entry's id: this file, written
#: with the entries, maps grubenv's imgbase_fallback (an id) to its position
FALLBACK = "imgbase-fallback.cfg"
#: the rescue entries, one per base with its own kernel in /boot/<base>/ (after the layers'
#: entries, so GRUB's fallback positions stay those of FALLBACK)
RESCUE = "imgbase-rescue.cfg"
#: what a rescue boot adds: the base read-only under a tmpfs overlay (the initramfs's
#: imgbase-live), activated although LVM skips it (imgbase-rescue), to a root shell on the
#: console even though root has no password
RESCUE_ARGS = ("ro", "imgbase.rescue", "imgbase.live", "systemd.unit=rescue.target",
               "systemd.setenv=SYSTEMD_SULOGIN_FORCE=1")
RESCUE_CONSOLES = ("console=tty0", "console=ttyS0,115200")
GRUBENV = "grubenv"
ENTRY_RE = re.compile(r"^menuentry [^\n]*--id '([^']+)' \{\n.*?^\}\n", re.M | re.S)
# an entry exactly as :func:`entry` writes it: three lines, words GRUB reads literally
STRICT_RE = re.compile(r"menuentry 'imgbase ([^'\n]+)' --id '\1' \{\n"
                       r"  linux /\1/vmlinuz (root=[^ \n]+(?: [^ \n]+)*)\n"
                       r"  initrd /\1/initrd\.img\n\}\n")


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
    GRUB's own fallback if the default entry cannot even be loaded -- a kernel that is
    missing, or that Secure Boot refuses -- through the position :data:`FALLBACK` sets).
    The menu waits 2 s,
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
        f"if [ -f /{GRUB_DIR}/{FALLBACK} ]; then source /{GRUB_DIR}/{FALLBACK}; fi\n"
        f"if [ -f /{GRUB_DIR}/{RESCUE} ]; then source /{GRUB_DIR}/{RESCUE}; fi\n"
    )


def rescue_id(base: str) -> str:
    """The menu id of a base's rescue entry (``imgbase boot --rescue`` names it)."""
    return f"rescue-{base}"


def rescue_base(entry_id: str) -> str | None:
    """The base a rescue entry's id names (None: not a rescue entry's id).

    >>> rescue_base("rescue-n-1-1"), rescue_base("n-1-1+1")
    ('n-1-1', None)
    """
    prefix = rescue_id("")
    return entry_id.removeprefix(prefix) if entry_id.startswith(prefix) else None


def rescue_entry(base: str, root: str, boot_uuid: str | None, consoles: tuple[str, ...]
                 ) -> str:
    """A base's rescue entry: its own kernel in /boot/<base>/, the base as the lower layer
    of a tmpfs overlay, rescue.target; /boot found again by its UUID (imgbase.boot=).

    >>> text = rescue_entry("n-1-1", "/dev/vg/n-1-1", "u-1", ("console=ttyS0",))
    >>> text.splitlines()[0]
    "menuentry 'imgbase rescue n-1-1' --id 'rescue-n-1-1' {"
    >>> text.split()[9:12]
    ['root=/dev/vg/n-1-1', 'ro', 'imgbase.rescue']
    >>> text.split()[-5:-3]
    ['imgbase.boot=u-1', 'console=ttyS0']
    """
    if not base or UNSAFE.search(base):
        die(f"base name {base!r} cannot go into a boot entry", hint="a base is <nvr>")
    args = [*RESCUE_ARGS, *([f"imgbase.boot={boot_uuid}"] if boot_uuid else []),
            *consoles]
    return (f"menuentry 'imgbase rescue {base}' --id '{rescue_id(base)}' {{\n"
            f"  linux /{base}/vmlinuz {cmdline(root, ' '.join(args))}\n"
            f"  initrd /{base}/initrd.img\n}}\n")


def rescue_consoles(kargs: str) -> tuple[str, ...]:
    """The console= arguments of a layer's kernel arguments (RESCUE_CONSOLES if none).

    >>> rescue_consoles("rw console=ttyS1,57600 quiet")
    ('console=ttyS1,57600',)
    >>> rescue_consoles("rw")
    ('console=tty0', 'console=ttyS0,115200')
    """
    found = tuple(a for a in kargs.split() if a.startswith("console="))
    return found or RESCUE_CONSOLES


def read_rescue_menu(boot: Path) -> tuple[bool, frozenset[str]]:
    """Whether grub.cfg sources the rescue menu (grub.cfgs written before rescue entries do
    not), and the bases the menu has an entry for."""
    try:
        cfg = (boot / GRUB_DIR / "grub.cfg").read_text(errors="replace")
    except OSError:
        return False, frozenset()
    if f"source /{GRUB_DIR}/{RESCUE}" not in cfg:
        return False, frozenset()
    try:
        text = (boot / GRUB_DIR / RESCUE).read_text(errors="replace")
    except OSError:
        return True, frozenset()
    return True, frozenset(b for i in parse_entries(text) if (b := rescue_base(i)))


def rescue_steps(boot: Path, vg: str, bases: list[str], boot_uuid: str | None,
                 consoles: tuple[str, ...]) -> list[Step]:
    """grub/imgbase-rescue.cfg with one rescue entry per base in bases, newest first."""
    text = "".join(rescue_entry(b, f"/dev/{vg}/{b}", boot_uuid, consoles)
                   for b in sorted(set(bases), key=lambda b: layer_key(f"{b}+0"), reverse=True))
    return [Step("boot-rescue", write=(str(boot / GRUB_DIR / RESCUE),
                                       "# imgbase: one rescue entry per base\n" + text))]


def entry(layer: str, root: str, kargs: str) -> str:
    """A layer's menu entry. Every word in it is checked (:func:`imgbase.image.kargs.cmdline`):
    a value GRUB's script syntax would read (a quote, ``}``, ``$``, ``;``...) is refused
    here, whatever boundary let it through, so no entry can end early, swallow the entries
    after it or run a command.

    >>> entry("a+1", "/dev/vg/a+1", "rw x}")
    Traceback (most recent call last):
    ...
    imgbase.errors.InputError: kernel argument 'x}' cannot go into a boot entry
    """
    if not layer or UNSAFE.search(layer):
        die(f"layer name {layer!r} cannot go into a boot entry", hint="a layer is <nvr>+<n>")
    return (f"menuentry 'imgbase {layer}' --id '{layer}' {{\n"
            f"  linux /{layer}/vmlinuz {cmdline(root, kargs)}\n"
            f"  initrd /{layer}/initrd.img\n}}\n")


def entry_problem(layer: str, text: str) -> str | None:
    """Why an entry is not one GRUB is sure to read as imgbase wrote it (None: it is).

    >>> entry_problem("a+1", entry("a+1", "/dev/vg/a+1", "rw"))
    >>> print(entry_problem("a+1", entry("a+1", "/dev/vg/a+1", "rw").replace("rw", "r$w")))
    the entry of a+1 has a word GRUB does not read literally: 'r$w'
    """
    m = STRICT_RE.fullmatch(text)
    if m is None or m.group(1) != layer:
        return f"the entry of {layer} is not one imgbase writes"
    bad = [w for w in m.group(2).split(" ") if UNSAFE.search(w)]
    return (f"the entry of {layer} has a word GRUB does not read literally: {bad[0]!r}"
            if bad else None)


def parse_entries(text: str) -> dict[str, str]:
    """Menu entries by id, in file order."""
    return {m.group(1): m.group(0) for m in ENTRY_RE.finditer(text)}


def render_entries(entries: dict[str, str]) -> str:
    """All entries, newest layer first."""
    return "".join(entries[k] for k in sorted(entries, key=layer_key, reverse=True))


def render_fallback(entries: dict[str, str]) -> str:
    """The menu position of each entry, for GRUB's ``fallback`` (in render_entries' order;
    the names are layer names, checked when their entries were).

    >>> print(render_fallback({"n-1-1+1": "", "n-1-1+2": ""}), end="")
    # imgbase: GRUB's fallback is a menu position; imgbase_fallback names a layer
    if [ "${imgbase_fallback}" = 'n-1-1+2' ]; then set fallback=0; fi
    if [ "${imgbase_fallback}" = 'n-1-1+1' ]; then set fallback=1; fi
    """
    lines = ["# imgbase: GRUB's fallback is a menu position; imgbase_fallback names a layer\n"]
    for i, name in enumerate(sorted(entries, key=layer_key, reverse=True)):
        if not name or UNSAFE.search(name):
            die(f"layer name {name!r} cannot go into the boot menu", hint="a layer is <nvr>+<n>")
        lines.append(f"if [ \"${{imgbase_fallback}}\" = '{name}' ]; then set fallback={i}; fi\n")
    return "".join(lines)


def unrecognised(text: str) -> str:
    """What of an entries file is not a menu entry imgbase wrote (whitespace aside).

    >>> unrecognised(entry("a+1", "/dev/v/a+1", "rw") + "garbage }\\n")
    'garbage }'
    """
    return ENTRY_RE.sub("", text).strip()


def read_entries(boot: Path) -> dict[str, str]:
    """The entries imgbase can parse ({} when there is no file: see :func:`read_menu`)."""
    return read_menu(boot)[0]


def read_menu(boot: Path) -> tuple[dict[str, str], str | None]:
    """The entries, and why the menu cannot be trusted to be what GRUB will read (None:
    it can). No file is not an empty menu: a /boot that is not mounted, or a file that
    does not parse, must not read as "no layer has an entry"."""
    path = boot / GRUB_DIR / ENTRIES
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, f"there is no {path}"
    except (OSError, UnicodeDecodeError) as exc:
        return {}, f"{path} cannot be read: {exc}"
    found = parse_entries(text)
    if junk := unrecognised(text):
        return found, (f"{path} has text that is not an imgbase menu entry: "
                       f"{junk.splitlines()[0][:60]!r}")
    problems = [p for name, block in found.items() if (p := entry_problem(name, block))]
    return found, (f"{path}: {problems[0]}" if problems else None)


def kernel_args(block: str) -> str:
    """The kernel arguments after root=... of an entry.

    >>> kernel_args(entry("a+1", "/dev/vg/a+1", "rw quiet"))
    'rw quiet'
    """
    m = re.search(r"^\s*(?:linux \S+|options) root=\S+ ?(.*)$", block, re.M)
    return m.group(1).strip() if m else "rw"


def write_steps(boot: Path, current: dict[str, str], changes: dict[str, str | None]
                ) -> list[Step]:
    """Rewrite the entries file with the changed entries (None: removed).

    All entries share the file GRUB sources, and one that does not parse can take those
    after it along (an open quote runs on through the fallback's entry): a file with an
    entry that is not three literal lines (one an older imgbase wrote with an image's
    unchecked argument) is written only by a repair: a write that leaves fewer bad entries
    than it found (one `kargs --delete` or `layer --remove` at a time, even with two bad
    entries). Anything else is refused and the hint names the repair."""
    entries = {k: v for k, v in {**current, **changes}.items() if v is not None}
    before = {name for name, block in current.items() if entry_problem(name, block)}
    bad = {name: problem for name, block in entries.items()
           if (problem := entry_problem(name, block))}
    if bad and not set(bad) < before:
        name = next(n for n in bad if n not in before) if set(bad) - before else next(iter(bad))
        die(f"{bad[name]}; it would break the menu GRUB reads",
            hint=f"imgbase kargs --layer {name} --delete ARG (or layer --remove {name}) "
                 "first")
    return [Step("boot-entries", write=(str(boot / GRUB_DIR / ENTRIES),
                                        render_entries(entries))),
            Step("boot-fallback", write=(str(boot / GRUB_DIR / FALLBACK),
                                         render_fallback(entries)))]


def read_grubenv(path: Path) -> dict[str, str]:
    """Variables of a grubenv block ({} if there is none)."""
    return grubenv.read(path)
