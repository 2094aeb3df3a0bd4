"""Which layer boots: the default, a one-time next boot, trials with a boot counter.

grubenv holds it all (see :func:`imgbase.bootloader.grub.grub_cfg`):
``saved_entry`` the default layer, ``next_entry`` a one-time boot, and while a
new default is on trial ``imgbase_tries`` (boots left, counted down by GRUB) and
``imgbase_fallback`` (the good layer GRUB goes back to at 0).

:func:`assess` is the pure decision ``imgbase health`` takes after each boot:
fell back → record the abandoned layer and make the fallback the default again;
on trial and healthy → mark good (clear the counter); on trial and not → reboot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..bootloader import committed, grubenv, uses_bls
from ..bootloader.grub import menu_timeout_env, rescue_id
from ..errors import die
from ..plan import Plan, Step
from .facts import NodeFacts

DEFAULT_TRIES = 3
TRIAL_KEYS = ("imgbase_tries", "imgbase_fallback")


def _env_plan(f: NodeFacts, operation: str, env: dict[str, str]) -> Plan:
    """One grubenv write, refused when /boot is not mounted (GRUB would not see it)."""
    f.need_boot()
    return Plan(operation, tuple(committed(f.boot, [
        Step("grubenv", write=(str(f.boot / "grub/grubenv"), grubenv.render(env)))])))


def _need_layer(f: NodeFacts, layer: str) -> None:
    f.need_boot()  # an unmounted /boot has no entries: say that, not "no boot entry"
    if f.layout.get(layer) not in f.layout.layers:
        die(f"{layer} is not a layer of this node", hint="imgbase layer --list names them")
    if layer not in f.entries:
        die(f"layer {layer} has no boot entry", hint="imgbase recover, then layer --add")


def trial_env(env: dict[str, str], layer: str, tries: int, fallback: str) -> dict[str, str]:
    """grubenv with layer the default on trial (tries boots, then fallback); a pending
    next boot and an older trial dropped, the other variables kept.

    >>> trial_env({"next_entry": "a+1", "imgbase_timeout": "0"}, "b+1", 3, "a+1")
    {'imgbase_timeout': '0', 'saved_entry': 'b+1', 'imgbase_tries': '3', 'imgbase_fallback': 'a+1'}
    """
    kept = {k: v for k, v in env.items() if k not in TRIAL_KEYS and k != "next_entry"}
    return {**kept, "saved_entry": layer, "imgbase_tries": str(tries),
            "imgbase_fallback": fallback}


def plan_next(f: NodeFacts, layer: str) -> Plan:
    """Boot layer once, at the next boot; the default stays."""
    _need_layer(f, layer)
    return _env_plan(f, "boot-next", {**f.env, "next_entry": layer})


def plan_rescue(f: NodeFacts, base: str | None) -> Plan:
    """Boot a base's rescue entry once, at the next boot (default: the booted layer's
    base, else the default layer's)."""
    f.need_boot()
    default = f.layout.get(f.default or "")
    base = base or f.booted_base or f.rescued or (default.origin if default else None)
    if base is None or f.layout.get(base) not in f.layout.bases:
        die(f"{base} is not a base of this node" if base else "no base to rescue",
            hint="imgbase base --list names the bases")
    if not f.rescue_menu:
        die("this node's GRUB reads no rescue menu (a BLS /boot, or a grub.cfg written "
            "before rescue entries)", hint="pick an older layer in GRUB's menu instead")
    if base not in f.rescue:
        die(f"base {base} has no rescue entry", hint=f"imgbase layer --add {base} gives it one")
    return _env_plan(f, "boot-rescue", {**f.env, "next_entry": rescue_id(base)})


def plan_set_default(f: NodeFacts, layer: str, tries: int | None = DEFAULT_TRIES) -> Plan:
    """Make layer the default; with tries, on trial: GRUB falls back after that many boots."""
    _need_layer(f, layer)
    if tries is not None and not 1 <= tries <= 9:
        die(f"--tries {tries} is out of range", hint="give 1 to 9, or --no-trial")
    env = {k: v for k, v in f.env.items() if k not in TRIAL_KEYS and k != "next_entry"}
    env["saved_entry"] = layer
    good = f.booted if f.booted and f.env.get("imgbase_tries", "") == "" else f.default
    if tries is not None and good and good != layer:
        env.update(imgbase_tries=str(tries), imgbase_fallback=good)
    return _env_plan(f, "boot-default", env)


def plan_menu_timeout(f: NodeFacts, seconds: int) -> Plan:
    """How long GRUB's menu waits before it boots the default (0: not at all).

    A fleet reboots faster without the wait; a node with a console an admin watches may
    want longer to pick an older layer by hand."""
    if uses_bls(f.boot):
        die("this node boots through the distribution's grub.cfg (BLS entries): imgbase does "
            "not own its menu", hint="set GRUB_TIMEOUT in /etc/default/grub, then grub2-mkconfig")
    env = {**f.env, **menu_timeout_env(seconds)}
    return _env_plan(f, "boot-menu-timeout", env)


@dataclass(frozen=True)
class Assessment:
    env: dict[str, str]  # the grubenv to write (== the old one when nothing changes)
    events: list[dict[str, Any]] = field(default_factory=list)  # for the history
    reboot: bool = False


def assess(env: dict[str, str], booted: str | None, healthy: bool, reason: str,
           history: list[dict[str, Any]]) -> Assessment:
    """What to do after a boot, given its health.

    >>> env = {"saved_entry": "n-2-1+1", "imgbase_tries": "0", "imgbase_fallback": "n-1-1+1"}
    >>> a = assess(env, "n-1-1+1", True, "ok", [])
    >>> a.env, a.events[0]["event"], a.events[0]["layer"]
    ({'saved_entry': 'n-1-1+1'}, 'abandoned', 'n-2-1+1')
    >>> a = assess({**env, "imgbase_tries": "2"}, "n-2-1+1", True, "ok", [])
    >>> a.env, a.reboot
    ({'saved_entry': 'n-2-1+1'}, False)
    >>> assess({**env, "imgbase_tries": "2"}, "n-2-1+1", False, "units: x", []).reboot
    True
    """
    tries = env.get("imgbase_tries", "")
    trial, fallback = env.get("saved_entry"), env.get("imgbase_fallback")
    new = dict(env)
    events: list[dict[str, Any]] = []
    if tries and booted is not None and booted == fallback and trial != booted:
        if tries == "0":
            last = next((h for h in reversed(history) if h.get("layer") == trial
                         and h.get("event") == "health"), None)
            why = (f"unhealthy: {last['reason']}" if last and not last.get("good")
                   else "did not come up to its health checks")
            events.append({"event": "abandoned", "layer": trial, "fallback": booted,
                           "reason": why})
            new = {k: v for k, v in env.items() if k not in TRIAL_KEYS}
            new["saved_entry"] = booted
        return Assessment(new, events)
    if tries and booted == trial:
        if healthy:
            new = {k: v for k, v in env.items() if k not in TRIAL_KEYS}
            events.append({"event": "marked-good", "layer": booted})
            return Assessment(new, events)
        return Assessment(new, events, reboot=True)
    return Assessment(new, events)
