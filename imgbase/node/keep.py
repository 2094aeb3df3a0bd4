"""What no planner that removes layers may touch: the one keep set of `recover` and `gc`.

A layer is kept, with its base, when it is

* **booted**: the running root;
* **default**: grubenv's ``saved_entry``, what boots next;
* **next boot**: grubenv's ``next_entry``, a one-time boot;
* **fallback**: grubenv's ``imgbase_fallback``, what GRUB boots when a trial runs out;
* **staged**: complete (its boot entry written, not tagged incomplete), newer than the
  booted layer, and neither abandoned nor rolled back from: what ``update
  --stage-only`` (the agent) left for the reboot to switch to;
* **last good**: the layer most recently found healthy other than the booted one, the
  way back ``imgbase rollback`` takes.

A base is kept when it is pinned (tag ``imgbase:pinned``) or one of its layers is kept.

The set is built from the menu, so it is only built when the menu can be read: with
/boot not mounted, no entries file, an entries file that does not parse, or no default
in grubenv, :func:`keep_set` refuses -- the planner removes nothing rather than
everything it cannot see named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..bootloader.grub import rescue_base
from ..errors import ImgbaseError
from ..image.naming import Nvr
from ..storage.layout import TAG_INCOMPLETE
from .facts import NodeFacts

TAG_PINNED = "imgbase:pinned"


@dataclass(frozen=True)
class Keep:
    """Kept layer and base names, each with why (the first reason found)."""

    why: tuple[tuple[str, str], ...]

    def __contains__(self, name: object) -> bool:
        return any(name == kept for kept, _ in self.why)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.why)


def left_behind(history: list[dict[str, Any]]) -> set[str]:
    """Layers GRUB or the health gate abandoned, and those the admin rolled back from."""

    return ({str(h.get("layer")) for h in history if h.get("event") == "abandoned"}
            | rolled_back_from(history))


def _nvr(name: str | None) -> Nvr | None:
    try:
        return Nvr.parse(name) if name else None
    except ImgbaseError:
        return None


def staged(f: NodeFacts, history: list[dict[str, Any]]) -> list[str]:
    """Complete layers of a newer image than the booted one, not given up on."""
    booted = _nvr(f.booted_base)
    left = left_behind(history)
    found = []
    for lv in f.layout.layers:
        nvr = _nvr(lv.origin)
        if (lv.name in f.entries and TAG_INCOMPLETE not in lv.tags and lv.name not in left
                and nvr is not None and (booted is None or nvr > booted)):
            found.append(lv.name)
    return found


def last_good_layer(f: NodeFacts, history: list[dict[str, Any]]) -> str | None:
    """The layer most recently found healthy, other than the booted one, still here."""
    layers = {lv.name for lv in f.layout.layers}
    return next((str(h["layer"]) for h in reversed(history)
                 if h.get("event") == "health" and h.get("good") and h.get("layer") != f.booted
                 and h.get("layer") in layers), None)


def keep_set(f: NodeFacts, history: list[dict[str, Any]]) -> Keep:
    """The keep set; refuses (one line, a hint) when the menu cannot be read."""
    f.need_menu()
    env = f.env
    layers = [
        (f.booted, "booted"),
        (env.get("saved_entry"), "the default"),
        (env.get("next_entry"), "the next boot"),
        (env.get("imgbase_fallback"), "the trial's fallback"),
        *((name, "staged") for name in staged(f, history)),
        (last_good_layer(f, history), "the last good layer"),
    ]
    why: dict[str, str] = {}
    for name, reason in layers:
        lv = f.layout.get(name) if name else None
        if lv is None or name is None:
            continue
        why.setdefault(name, reason)
        if lv.origin:
            why.setdefault(lv.origin, f"the base of {name} ({reason})")
    next_entry = env.get("next_entry") or ""
    rescue_next = rescue_base(next_entry)
    for name, reason in ((f.rescued, "the rescue system running"),
                         (rescue_next, "its rescue entry boots next")):
        if name and f.layout.get(name) is not None:
            why.setdefault(name, reason)
    for lv in f.layout.bases:
        if TAG_PINNED in lv.tags:
            why.setdefault(lv.name, "pinned")
    return Keep(tuple(why.items()))

def rolled_back_from(history: list[dict[str, Any]]) -> set[str]:
    """Layers an admin rolled back from and has not rolled to again since.

    >>> rolled_back_from([{"event": "rolled-back", "layer": "n-2-1+1", "to": "n-1-1+1"}])
    {'n-2-1+1'}
    >>> rolled_back_from([{"event": "rolled-back", "layer": "n-2-1+1", "to": "n-1-1+1"},
    ...                   {"event": "rolled-back", "layer": "n-1-1+1", "to": "n-2-1+1"}])
    {'n-1-1+1'}
    """
    left: set[str] = set()
    for event in history:
        if event.get("event") == "rolled-back":
            left.discard(str(event.get("to")))
            left.add(str(event.get("layer")))
    return left
