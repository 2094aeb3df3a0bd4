"""`imgbase recover`: remove what an interrupted operation left, never what boots.

It works from the state itself, not only from the journal: whatever cut an
operation short (a crash, a kill, power loss), the leftovers are visible.

* mounts under /run/imgbase/work (an operation killed before it unmounted);
* LVs tagged ``imgbase:incomplete`` (a base, layer or volume being made);
* layers with no boot entry (made, but never given one);
* boot entries with no layer, and their files in /boot;
* LVs tagged ``imgbase:retired`` (anaconda's root after layout --init) once unused.

The booted layer and its base are never touched, whatever their tags say; the
journal of the interrupted operation is reported, then cleared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import bootloader
from .plan import JOURNAL, Plan, Step
from .status import NodeFacts
from .storage.layout import TAG_INCOMPLETE, TAG_RETIRED, WORK


def plan_recover(f: NodeFacts, work_mounts: list[str], journal: list[dict[str, Any]],
                 journal_path: Path = JOURNAL) -> Plan:
    layout = f.layout
    keep = {f.booted, f.booted_base} - {None}
    steps: list[Step] = [Step(f"umount-{Path(m).name}", ("umount", "-l", m))
                         for m in sorted(work_mounts, reverse=True)]
    doomed: list[str] = []
    for lv in layout.tagged(TAG_INCOMPLETE):
        if lv.name not in keep:
            doomed.append(lv.name)
    for lv in layout.layers:
        if lv.name not in f.entries and lv.name not in keep and lv.name not in doomed:
            doomed.append(lv.name)
    for lv in layout.tagged(TAG_RETIRED):
        if not lv.open and lv.name not in keep and lv.name not in doomed:
            doomed.append(lv.name)
    layer_names = {lv.name for lv in layout.layers}
    entries = dict(f.entries)
    dangling = [name for name in entries if name not in layer_names or name in doomed]
    for name in dangling:
        steps += bootloader.remove_entry_steps(f.boot, name, entries)
        entries.pop(name)
    def snapshots_first(name: str) -> bool:
        lv = layout.get(name)
        return lv is None or not lv.origin

    for name in sorted(doomed, key=snapshots_first):
        steps.append(Step(f"remove-{name}", ("lvremove", "-y", f"{layout.vg}/{name}")))
    if journal:
        steps.append(Step("clear-journal", ("rm", "-f", str(journal_path))))
    return Plan("recover", tuple(steps), failure_hint="run imgbase recover again")


def interrupted(journal: list[dict[str, Any]]) -> str | None:
    """What the journal says was cut short, e.g. "layer-add, after step layer-mount".

    >>> interrupted([{"event": "begin", "operation": "layer-add"},
    ...              {"event": "start", "step": "a"}, {"event": "done", "step": "a"}])
    'layer-add, after step a'
    >>> interrupted([]) is None
    True
    """
    if not journal:
        return None
    op = journal[0].get("operation", "an operation")
    done = [r["step"] for r in journal if r.get("event") == "done"]
    failed = [r for r in journal if r.get("event") == "failed"]
    if failed:
        return f"{op}, failed at step {failed[-1]['step']}"
    return f"{op}, after step {done[-1]}" if done else f"{op}, before its first step"


def work_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1] for line in f]
    prefix = f"{WORK}/"
    return [t for t in targets if t.startswith(prefix)]
