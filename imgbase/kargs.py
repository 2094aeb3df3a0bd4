"""Kernel arguments of a layer: kept in its boot entry, edited by `imgbase kargs`.

``root=`` belongs to imgbase (it names the layer) and cannot be edited; an
argument that would break out of the entry (quotes, newlines, ``$``, braces,
backslashes, ``;``) is refused.

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

from .errors import die

UNSAFE = re.compile(r"""['"`$\\{};\s]""")


def check_arg(arg: str) -> str:
    if not arg or UNSAFE.search(arg):
        die(f"kernel argument {arg!r} cannot go into a boot entry",
            hint="no quotes, spaces, newlines, $, braces, backslashes or ;")
    if arg.split("=", 1)[0] == "root":
        die("root= is set by imgbase for each layer", hint="it names the layer's LV")
    return arg


def edit(current: list[str], *, append: list[str] | None = None,
         delete: list[str] | None = None, replace: list[str] | None = None) -> list[str]:
    """Apply deletions, replacements (OLD=NEW, split at the '=' that makes OLD present),
    then appends (not duplicated)."""
    args = list(current)
    for arg in delete or []:
        check_arg(arg)
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
