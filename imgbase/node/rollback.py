"""``imgbase rollback [--to LAYER]``: make the previously booted good layer (from the
health history: not simply the previous NVR) the default again, with no trial -- it has
been good. One grubenv write, and the history remembers the image the admin left.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import die
from ..plan import Plan, Step
from .boot import plan_set_default
from .facts import NodeFacts


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
