"""`imgbase recover`: remove what an interrupted operation left, never what boots.

It works from the state itself, not only from the journal: whatever cut an
operation short (a crash, a kill, power loss), the leftovers are visible.

* mounts under /run/imgbase/work (an operation killed before it unmounted);
* LVs tagged ``imgbase:incomplete`` (a base, layer or volume being made);
* layers with no boot entry (made, but never given one);
* boot entries with no layer, and their files in /boot; the rescue entry and kernel of a
  base it removes, and a rescue kernel whose base is gone;
* LVs tagged ``imgbase:retired`` (anaconda's root after layout --init) once unused;
* on imgbase's ESP, shim and grub files that are missing or torn (not what its record says
  was written) and grub.cfg stubs that do not find /boot, rewritten from the booted image;
  a whole chain a newer image wrote is left (a downgrade Secure Boot's SBAT may refuse).

What :mod:`imgbase.node.keep` keeps -- the booted, default, next-boot, fallback, staged and
last good layers and their bases, the pinned bases -- is never touched, whatever its
tags say; and recover refuses, removing nothing, when it cannot read the menu (/boot not
mounted, no entries file or one that does not parse, no default in grubenv): a layer
"with no boot entry" is only one when the menu says so. The journal of the interrupted
operation is reported, then cleared.

One operation is finished rather than undone: an update cut short after its new layer
was complete, with only the switch of the default left. Recover makes that switch (on
trial, as the update would have), so the node boots what the admin asked for.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import bootloader
from ..bootloader import efi
from ..plan import JOURNAL, Plan, Step
from ..storage.layout import TAG_INCOMPLETE, TAG_RETIRED, WORK
from .boot import plan_set_default
from .facts import NodeFacts, named_dirs
from .keep import keep_set
from .layers import rescue_menu_steps


def plan_recover(f: NodeFacts, work_mounts: list[str], journal: list[dict[str, Any]],
                 journal_path: Path = JOURNAL, boot_dirs: tuple[str, ...] = (),
                 history: list[dict[str, Any]] | None = None,
                 esp_stale: tuple[str, ...] | None = None) -> Plan:
    """boot_dirs: the layer-named directories in /boot (kernel and initrd of a layer);
    history: the health history (the last good layer is kept); esp_stale: the ESP's files
    to rewrite from the booted image (:func:`esp_stale`), None: the ESP is as it should be."""
    layout = f.layout
    keep = keep_set(f, history or []).names
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
    # a layer's kernel and initrd copied, its entry never written (cut in between, or the
    # copy failed on a full /boot): gone with the layer, or left by one already gone
    for name in boot_dirs:
        if name not in entries and (name not in layer_names or name in doomed) \
                and name not in keep:
            steps.append(Step(f"boot-files-{name}", ("rm", "-rf", "--one-file-system",
                                                     str(f.boot / name))))

    def snapshots_first(name: str) -> bool:
        lv = layout.get(name)
        return lv is None or not lv.origin

    finish = finish_update_steps(f, journal, doomed)
    undo_base = _unfinished_update_base(f, journal, doomed, keep) if not finish else None
    # a base that goes takes its rescue entry and kernel along (menu first); and a rescue
    # kernel whose base is gone already (a cut after the base's lvremove) goes too
    orphans = tuple(d for d in f.base_dirs if layout.get(d) is None and d not in keep)
    steps += rescue_menu_steps(f, drop=tuple(b for b in (*doomed, undo_base, *orphans) if b))
    for name in sorted(doomed, key=snapshots_first):
        steps.append(Step(f"remove-{name}", ("lvremove", "-y", f"{layout.vg}/{name}")))
    if undo_base:
        steps.append(Step(f"remove-{undo_base}", ("lvremove", "-y", f"{layout.vg}/{undo_base}")))
    steps += finish
    if esp_stale is not None and f.esp_boot_uuid and f.booted_base:
        steps += efi.sync_steps(f.boot / "efi", Path("/"), f.esp_boot_uuid, f.booted_base,
                                list(esp_stale))
    steps = bootloader.committed(f.boot, steps)
    if journal:
        steps.append(Step("clear-journal", ("rm", "-f", str(journal_path))))
    return Plan("recover", tuple(steps), failure_hint="run imgbase recover again")


def _unfinished_update_base(f: NodeFacts, journal: list[dict[str, Any]], doomed: list[str],
                            keep: frozenset[str]) -> str | None:
    """The base an update made before it was cut short, once it has no layer left: a base
    that is complete but was never given its layer would otherwise stay for good."""
    if not journal or journal[0].get("operation") != "update":
        return None
    base = str(journal[0].get("base") or "")
    if not base or f.layout.get(base) is None or base in keep or base in doomed:
        return None
    if any(la.name not in doomed for la in f.layout.layers_of(base)):
        return None
    return base


def finish_update_steps(f: NodeFacts, journal: list[dict[str, Any]], doomed: list[str]
                        ) -> list[Step]:
    """The update's last step (the default, on trial), when only that was left undone."""
    if not journal or journal[0].get("operation") != "update" or journal[0].get("stage_only"):
        return []
    done = {r.get("step") for r in journal if r.get("event") == "done"}
    layer, tries = journal[0].get("layer"), journal[0].get("tries", "3")
    if ("layer-complete" not in done or "boot-default" in done or not layer
            or layer in doomed or layer not in f.entries or f.layout.get(layer) is None):
        return []
    if f.default == layer:
        return []
    plan = plan_set_default(f, layer, int(tries))
    return [replace(s, name="finish-update-default", note="the update was complete but for this")
            for s in plan.steps if s.write]  # (the commit of /boot comes with the plan's)




def esp_stale(f: NodeFacts) -> tuple[str, ...] | None:
    """The ESP files to rewrite from the booted image (:func:`imgbase.bootloader.efi.repair`:
    missing or torn files and the stubs, never a whole chain another image wrote)."""
    if f.esp_boot_uuid is None or f.booted is None:
        return None
    return efi.repair(f.boot / "efi", Path("/"), f.esp_boot_uuid)


def work_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1] for line in f]
    prefix = f"{WORK}/"
    return [t for t in targets if t.startswith(prefix)]


def layer_dirs(boot: Path) -> tuple[str, ...]:
    """Directories in /boot named like layers."""
    from ..image.naming import Layer

    return named_dirs(boot, Layer.parse)
