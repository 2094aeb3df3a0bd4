"""Rollback, pinning and garbage collection of images (bases with their layers).

* ``imgbase rollback [--to LAYER]``: make the previously booted good layer (from the
  health history: not simply the previous NVR) the default again, with no trial — it
  has been good. One grubenv write.
* ``imgbase pin|unpin BASE``: a pinned base (tag ``imgbase:pinned``) is never collected.
* ``imgbase gc [--keep N]``: keep the N newest bases (default 2) plus those of the booted
  and default layers and the pinned ones; remove the others with their layers.
"""

from __future__ import annotations

from typing import Any

from . import bootloader
from .boot import plan_set_default
from .errors import die
from .plan import Plan, Step
from .status import NodeFacts
from .storage.layout import layer_key

TAG_PINNED = "imgbase:pinned"
DEFAULT_KEEP = 2


def rollback_target(f: NodeFacts, history: list[dict[str, Any]]) -> str:
    """The layer most recently found healthy that is not the booted one and still exists."""
    layers = {lv.name for lv in f.layout.layers}
    for record in reversed(history):
        name = record.get("layer")
        if (record.get("event") == "health" and record.get("good") and name != f.booted
                and name in layers and name in f.entries):
            return str(name)
    die("no earlier good layer to roll back to", hint="name one: imgbase rollback --to LAYER")


def plan_rollback(f: NodeFacts, history: list[dict[str, Any]], to: str | None) -> Plan:
    target = to or rollback_target(f, history)
    plan = plan_set_default(f, target, tries=None)
    return Plan("rollback", plan.steps)


def plan_pin(f: NodeFacts, base: str, pin: bool) -> Plan:
    lv = f.layout.get(base)
    if lv is None or lv not in f.layout.bases:
        die(f"{base} is not a base of this node", hint="imgbase base --list names them")
    flag = "--addtag" if pin else "--deltag"
    return Plan("pin" if pin else "unpin", (Step("tag", ("lvchange", flag, TAG_PINNED,
                                                        lv.path)),))


def plan_gc(f: NodeFacts, keep: int = DEFAULT_KEEP) -> Plan:
    if keep < 1:
        die(f"--keep {keep}: at least one image is kept", hint="give --keep 1 or more")
    bases = sorted(f.layout.bases, key=lambda lv: layer_key(f"{lv.name}+0"), reverse=True)
    in_use = {lv.origin for lv in f.layout.layers if lv.name in (f.booted, f.default)}
    kept = {lv.name for lv in bases[:keep]} | in_use | {
        lv.name for lv in bases if TAG_PINNED in lv.tags}
    steps: list[Step] = []
    entries = dict(f.entries)
    for base in (lv for lv in bases if lv.name not in kept):
        for layer in f.layout.layers_of(base.name):
            steps += bootloader.remove_entry_steps(f.boot, layer.name, entries)
            entries.pop(layer.name, None)
            steps.append(Step(f"remove-{layer.name}", ("lvremove", "-y", layer.path)))
        steps.append(Step(f"remove-{base.name}", ("lvremove", "-y", base.path)))
    return Plan("gc", tuple(steps))
