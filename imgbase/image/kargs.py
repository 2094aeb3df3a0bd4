"""Kernel arguments of a layer: kept in its boot entry, edited by `imgbase kargs`.

``root=`` belongs to imgbase (it names the layer) and cannot be edited. An argument
is written into a GRUB script (or a BLS ``options`` line, which GRUB expands too), so
:func:`check_arg` is the one gate for every argument wherever it comes from (``kargs``
edits, an image's ``kernel_args`` at update or install, a kickstart's ``--karg``) and
the entry writers call it again: only letters, digits and ``. _ , : = / + @ % ^ ~ ! -``
pass -- nothing GRUB's script syntax gives a meaning to (quotes, ``$``, braces,
backslashes, ``;``, ``|``, ``&``, ``<>``, ``()``, ``#``, wildcards, whitespace).

>>> edit(["rw", "quiet", "console=ttyS0"], append=["mitigations=off"], delete=["quiet"])
['rw', 'console=ttyS0', 'mitigations=off']
>>> edit(["rw", "console=ttyS0"], replace=["console=ttyS0=console=tty1"])
['rw', 'console=tty1']
>>> edit(["rw"], append=["a'b"])
Traceback (most recent call last):
...
imgbase.errors.InputError: kernel argument "a'b" cannot go into a boot entry
"""

from __future__ import annotations

import re

from ..errors import die

# any character outside what GRUB's script syntax reads as a plain word character
UNSAFE = re.compile(r"[^A-Za-z0-9._,:=/+@%^~!-]")
MAX_ARG = 1024  # the kernel's whole command line is 2048 bytes on x86
HINT = "letters, digits and . _ , : = / + @ % ^ ~ ! - only (no quotes, spaces, $, braces...)"


def check_arg(arg: str) -> str:
    """arg, if it can go into a boot entry as it is.

    >>> check_arg("console=ttyS0,115200n8")
    'console=ttyS0,115200n8'
    >>> check_arg("x}")
    Traceback (most recent call last):
    ...
    imgbase.errors.InputError: kernel argument 'x}' cannot go into a boot entry
    """
    if not isinstance(arg, str) or not arg or UNSAFE.search(arg) or len(arg) > MAX_ARG:
        die(f"kernel argument {arg!r} cannot go into a boot entry", hint=HINT)
    if arg.split("=", 1)[0] == "root":
        die("root= is set by imgbase for each layer", hint="it names the layer's LV")
    return arg


def check_args(args: object, what: str = "kernel arguments") -> tuple[str, ...]:
    """A list of arguments from outside (an image's image.json, a spec), each checked.

    >>> check_args(["rw", "quiet"])
    ('rw', 'quiet')
    >>> check_args("rw quiet")
    Traceback (most recent call last):
    ...
    imgbase.errors.InputError: kernel arguments: 'rw quiet' is not a list of arguments
    """
    if not isinstance(args, list | tuple):
        die(f"{what}: {args!r} is not a list of arguments", hint='e.g. ["console=ttyS0"]')
    return tuple(check_arg(a) for a in args)


def cmdline(root: str, kargs: str) -> str:
    """The kernel's words in a boot entry: root= and the arguments, each checked.

    >>> cmdline("/dev/vg/n-1-1+1", "rw  quiet")
    'root=/dev/vg/n-1-1+1 rw quiet'
    """
    if not root or UNSAFE.search(root):
        die(f"root device {root!r} cannot go into a boot entry", hint="an LV path: /dev/VG/LV")
    return " ".join([f"root={root}", *(check_arg(a) for a in kargs.split())])


def edit(current: list[str], *, append: list[str] | None = None,
         delete: list[str] | None = None, replace: list[str] | None = None) -> list[str]:
    """Apply deletions, replacements (OLD=NEW, split at the '=' that makes OLD present),
    then appends (not duplicated). What is added is checked; what is deleted or replaced
    need only be there.

    >>> edit(["rw", "x}"], delete=["x}"])
    ['rw']
    """
    args = list(current)
    for arg in delete or []:  # unchecked: deleting is how a bad argument is repaired
        if arg not in args:
            die(f"kernel argument {arg} is not set", hint="imgbase kargs --list shows them")
        args = [a for a in args if a != arg]
    for spec in replace or []:
        old, new = _split_replace(spec, args)
        args = [check_arg(new) if a == old else a for a in args]
    for arg in append or []:
        if check_arg(arg) not in args:
            args.append(arg)
    return args


def _split_replace(spec: str, args: list[str]) -> tuple[str, str]:
    """Split OLD=NEW where OLD may itself contain '=' (console=ttyS0=console=tty1)."""
    parts = spec.split("=")
    for i in range(1, len(parts)):
        old, new = "=".join(parts[:i]), "=".join(parts[i:])
        if old in args:
            return old, new
    die(f"--replace {spec}: no argument of this layer is the OLD part",
        hint="give OLD=NEW with OLD as imgbase kargs --list shows it")


def for_new_node(image_args: tuple[str, ...] | list[str]) -> str:
    """The kernel arguments of a node's first layer: rw, the image's, and panic=10
    (so that a kernel that cannot boot reboots and the boot counter runs down).

    >>> for_new_node(["console=ttyS0,115200"])
    'rw console=ttyS0,115200 panic=10'
    """
    args = ["rw", *image_args]
    if not any(a.startswith("panic=") for a in args):
        args.append("panic=10")
    return " ".join(args)
