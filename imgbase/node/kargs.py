"""``imgbase kargs``: a layer's kernel arguments, read from its boot entry and edited
through :func:`imgbase.image.kargs.edit` (the one gate), then written as a plan."""

from __future__ import annotations

import shlex

from ..bootloader import committed, entry, kernel_args, write_entry_steps
from ..errors import ImgbaseError, die
from ..image import kargs
from ..plan import Plan
from .facts import NodeFacts


def current(facts: NodeFacts, layer: str | None) -> tuple[str, list[str]]:
    """The layer (default: the booted one) and its kernel arguments; refused when /boot is
    not mounted or the layer has no boot entry."""
    facts.need_boot()  # an unmounted /boot has no entries to read or edit
    layer = layer or facts.booted
    if layer is None or layer not in facts.entries:
        die(f"{layer or 'the running root'} has no boot entry",
            hint="name a layer with --layer (imgbase layer --list)")
    return layer, kernel_args(facts.entries[layer]).split()


def plan_kargs(facts: NodeFacts, layer: str | None, *, append: list[str] | None = None,
               delete: list[str] | None = None, replace: list[str] | None = None) -> Plan:
    """The layer's entry rewritten with the edited arguments."""
    layer, args = current(facts, layer)
    new = kargs.edit(args, append=append, delete=delete, replace=replace)
    lv = facts.layout.get(layer)
    assert lv is not None  # every entry's layer is in the layout (facts.entries)
    changed: dict[str, str | None] = {layer: entry(facts.boot, layer, lv.path, " ".join(new))}
    return Plan("kargs", tuple(committed(facts.boot, write_entry_steps(
        facts.boot, facts.entries, changed))))


def model_args(facts: NodeFacts, layer: str | None) -> str:
    """The kernel arguments a new layer takes over from layer's entry ("rw" when there is
    none), refused -- with the way to repair it -- when one cannot go into an entry."""
    text = facts.entries.get(layer or "")
    if not text:
        return "rw"
    args = kernel_args(text)
    for arg in args.split():
        try:
            kargs.check_arg(arg)
        except ImgbaseError:
            die(f"the boot entry of {layer} has the kernel argument {arg!r}, which cannot go "
                "into a new entry", hint=f"remove it first: imgbase kargs --layer {layer} "
                f"--delete {shlex.quote(arg)}")
    return args
