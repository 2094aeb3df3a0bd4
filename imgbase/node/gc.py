"""Rollback, pinning and garbage collection of images (bases with their layers).

* ``imgbase rollback [--to LAYER]``: make the previously booted good layer (from the
  health history: not simply the previous NVR) the default again, with no trial — it
  has been good. One grubenv write.
* ``imgbase pin|unpin BASE``: a pinned base (tag ``imgbase:pinned``) is never collected.
* ``imgbase gc [--keep N]``: keep N images (default 2; ``[gc] keep`` in imgbase.toml) plus
  those :mod:`imgbase.node.keep` keeps (booted, default, next boot, fallback, staged, last
  good, pinned); remove the others with their layers. It refuses, removing nothing, when
  /boot is not mounted or its menu cannot be read. The N kept are the images most
  recently found healthy (then the newest): after a rollback from a bad v2 to v1 and an
  update to v3, v1 -- the known-good way back -- stays and v2 goes. ``imgbase health
  --act`` runs it after it marks a new layer good.
"""

from __future__ import annotations

import json
from typing import Any

from .. import bootloader
from ..config import GcSettings
from ..errors import die
from ..image.naming import layer_key
from ..plan import Plan, Step
from .boot import plan_set_default
from .facts import NodeFacts
from .keep import TAG_PINNED, keep_set


def rollback_target(f: NodeFacts, history: list[dict[str, Any]]) -> str:
    """The layer most recently found healthy that is not the booted one and still exists."""
    layers = {lv.name for lv in f.layout.layers}
    for record in reversed(history):
        name = record.get("layer")
        if (record.get("event") == "health" and record.get("good") and name != f.booted
                and name in layers and name in f.entries):
            return str(name)
    die("no earlier good layer to roll back to", hint="name one: imgbase rollback --to LAYER")


def plan_rollback(f: NodeFacts, history: list[dict[str, Any]], to: str | None,
                  now: float = 0.0) -> Plan:
    """The target becomes the default; the history records the rollback, so that the
    agent does not roll this node forward again to the image the admin left
    (:func:`keep.rolled_back_from`) -- until the admin picks it again or a newer one comes.

    """
    from .health import HISTORY, HISTORY_KEEP

    f.need_boot()  # before the target: an unmounted /boot shows no layer to roll back to
    target = to or rollback_target(f, history)
    steps = list(plan_set_default(f, target, tries=None).steps)
    if f.booted and f.booted != target:
        event = {"time": round(now), "event": "rolled-back", "layer": f.booted, "to": target}
        steps.append(Step("history", write=(str(HISTORY), json.dumps(
            [*history, event][-HISTORY_KEEP:], indent=1) + "\n"),
            note=f"remembered: the admin left {f.booted}"))
    return Plan("rollback", tuple(steps))



def plan_pin(f: NodeFacts, base: str, pin: bool) -> Plan:
    lv = f.layout.get(base)
    if lv is None or lv not in f.layout.bases:
        die(f"{base} is not a base of this node", hint="imgbase base --list names them")
    flag = "--addtag" if pin else "--deltag"
    return Plan("pin" if pin else "unpin", (Step("tag", ("lvchange", flag, TAG_PINNED,
                                                        lv.path)),))


def last_good(history: list[dict[str, Any]]) -> dict[str, float]:
    """Base name -> time one of its layers was last found healthy.

    >>> last_good([{"event": "health", "layer": "n-1-1+2", "good": True, "time": 5},
    ...            {"event": "health", "layer": "n-2-1+1", "good": False, "time": 6}])
    {'n-1-1': 5}
    """
    found: dict[str, float] = {}
    for record in history:
        name = str(record.get("layer") or "")
        if record.get("event") == "health" and record.get("good") and "+" in name:
            base = name.rsplit("+", 1)[0]
            found[base] = max(found.get(base, 0), record.get("time", 0))
    return found


def plan_gc(f: NodeFacts, keep: int = GcSettings.keep,
            history: list[dict[str, Any]] | None = None) -> Plan:
    if keep < 1:
        die(f"--keep {keep}: at least one image is kept", hint="give --keep 1 or more")
    history = history or []
    in_use = keep_set(f, history)
    good = last_good(history)
    bases = sorted(f.layout.bases, key=lambda lv: (good.get(lv.name, 0),
                                                   layer_key(f"{lv.name}+0")), reverse=True)
    kept = {lv.name for lv in bases[:keep]} | in_use.names
    steps: list[Step] = []
    entries = dict(f.entries)
    for base in (lv for lv in bases if lv.name not in kept):
        for layer in f.layout.layers_of(base.name):
            steps += bootloader.remove_entry_steps(f.boot, layer.name, entries)
            entries.pop(layer.name, None)
            steps.append(Step(f"remove-{layer.name}", ("lvremove", "-y", layer.path)))
        steps.append(Step(f"remove-{base.name}", ("lvremove", "-y", base.path)))
    return Plan("gc", tuple(bootloader.committed(f.boot, steps)))
