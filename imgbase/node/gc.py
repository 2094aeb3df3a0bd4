"""Pinning and garbage collection of images (bases with their layers).

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

from typing import Any

from .. import bootloader
from ..config import GcSettings
from ..errors import die
from ..image.naming import layer_key
from ..plan import Plan, Step
from .facts import NodeFacts
from .keep import TAG_PINNED, keep_set
from .layers import rescue_menu_steps


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
    gone = tuple(lv.name for lv in bases if lv.name not in kept)
    steps: list[Step] = rescue_menu_steps(f, drop=gone) if gone else []
    entries = dict(f.entries)
    for base in (lv for lv in bases if lv.name not in kept):
        for layer in f.layout.layers_of(base.name):
            steps += bootloader.remove_entry_steps(f.boot, layer.name, entries)
            entries.pop(layer.name, None)
            steps.append(Step(f"remove-{layer.name}", ("lvremove", "-y", layer.path)))
        steps.append(Step(f"remove-{base.name}", ("lvremove", "-y", base.path)))
    return Plan("gc", tuple(bootloader.committed(f.boot, steps)))
