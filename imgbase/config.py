"""The node's settings, ``/etc/imgbase/imgbase.toml``, read by this one reader.

One section per concern, each a frozen dataclass with its defaults; a file that does not
exist is all defaults. An unknown section or key, or a value of the wrong type or range, is
an error with file:line, and nothing is done::

    [check]                       # imgbase check: pool use limits, percent
    pool_data_max = 80
    pool_metadata_max = 80
    [gc]                          # imgbase gc, and health --act after a good boot
    keep = 2
    after_good_boot = true
    [health]                      # imgbase health: per-check timeout, required units
    timeout = 60
    required_units = ["local-fs.target", "systemd-journald.service", "libvirtd.service"]
    [trust]                       # may --insecure accept an unsigned image here?
    allow_insecure = false
    [network.bridges.br0]         # the node's network (imgbase.netconf); none: br0 by DHCP
    ports = ["primary"]

>>> load(Path("/nonexistent/imgbase.toml")).gc
GcSettings(keep=2, after_good_boot=True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import netconf
from .tomlconf import Source, Table

CONFIG = Path("/etc/imgbase/imgbase.toml")


@dataclass(frozen=True)
class CheckSettings:
    pool_data_max: float = 80.0
    pool_metadata_max: float = 80.0


@dataclass(frozen=True)
class GcSettings:
    keep: int = 2
    after_good_boot: bool = True  # health --act collects once a new layer is marked good


@dataclass(frozen=True)
class HealthSettings:
    timeout: float = 60.0
    # units whose failure makes a boot bad (required_units replaces them)
    required_units: tuple[str, ...] = ("local-fs.target", "systemd-journald.service",
                                       "libvirtd.service")


@dataclass(frozen=True)
class TrustSettings:
    allow_insecure: bool = False


@dataclass(frozen=True)
class Settings:
    check: CheckSettings = field(default_factory=CheckSettings)
    gc: GcSettings = field(default_factory=GcSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    trust: TrustSettings = field(default_factory=TrustSettings)
    network: netconf.Network | None = None  # None: not declared (install: netconf.DEFAULT)


def _table(src: Source, name: str, cls: type) -> Table | None:
    if name not in src.data:
        return None
    return Table(src, name, src.data[name], {f.name for f in fields(cls)})


def _percent(src: Source, t: Table, key: str, default: float) -> float:
    value: Any = t.data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100:
        src.fail(t.name, key, f"[{t.name}] {key} = {value!r} is not a percentage",
                 hint="give a number between 1 and 100")
    return float(value)


def _check(src: Source) -> CheckSettings:
    d = CheckSettings()
    t = _table(src, "check", CheckSettings)
    if t is None:
        return d
    return CheckSettings(_percent(src, t, "pool_data_max", d.pool_data_max),
                         _percent(src, t, "pool_metadata_max", d.pool_metadata_max))


def _gc(src: Source) -> GcSettings:
    d = GcSettings()
    t = _table(src, "gc", GcSettings)
    if t is None:
        return d
    keep: Any = t.data.get("keep", d.keep)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        src.fail("gc", "keep", f"[gc] keep = {keep!r} is not a number of images (1 or more)",
                 hint="e.g. keep = 2")
    auto: Any = t.data.get("after_good_boot", d.after_good_boot)
    if not isinstance(auto, bool):
        src.fail("gc", "after_good_boot", f"[gc] after_good_boot = {auto!r} is not true or "
                 "false", hint="after_good_boot = false")
    return GcSettings(keep, auto)


def _health(src: Source) -> HealthSettings:
    d = HealthSettings()
    t = _table(src, "health", HealthSettings)
    if t is None:
        return d
    timeout: Any = t.data.get("timeout", d.timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        src.fail("health", "timeout", f"[health] timeout = {timeout!r} is not a number of "
                 "seconds", hint="e.g. timeout = 60")
    units: Any = t.data.get("required_units", list(d.required_units))
    if not isinstance(units, list) or not all(isinstance(u, str) for u in units):
        src.fail("health", "required_units", "[health] required_units must be a list of "
                 "unit names", hint='e.g. required_units = ["libvirtd.service"]')
    return HealthSettings(float(timeout), tuple(units))


def _trust(src: Source) -> TrustSettings:
    t = _table(src, "trust", TrustSettings)
    if t is None:
        return TrustSettings()
    value: Any = t.data.get("allow_insecure", False)
    if not isinstance(value, bool):
        src.fail("trust", "allow_insecure", f"[trust] allow_insecure = {value!r} is not true "
                 "or false", hint="allow_insecure = false")
    return TrustSettings(value)


def _network(src: Source) -> netconf.Network | None:
    if "network" not in src.data:
        return None

    def fail(key: tuple[str, ...], message: str, hint: str | None) -> None:
        whole = ".".join(key)
        if re.search(rf"^\s*\[\s*{re.escape(whole)}\s*\]", src.text, re.M):
            src.fail(whole, None, message, hint)
        src.fail(".".join(key[:-1]), key[-1], message, hint)

    return netconf.parse_or_die(src.data["network"], fail)


def load_network(path: Path) -> netconf.Network:
    """The [network] of a file (``install --network``), checked; DEFAULT when it has none."""
    src = Source(path, missing_hint="give the TOML file with the node's [network]")
    return _network(src) or netconf.DEFAULT


SECTIONS = ("check", "gc", "health", "trust", "network")


def load(path: Path = CONFIG, only: tuple[str, ...] | None = None) -> Settings:
    """Every section of the node's settings, checked; defaults where the file is silent.

    ``only``: check and read these sections alone, defaults for the others -- for what
    runs at boot (health must judge the boot whatever else the file gets wrong)."""
    src = Source(path, missing_ok=True)
    if only is None:
        Table(src, "", src.data, set(SECTIONS))  # unknown sections

    def wanted(name: str) -> bool:
        return only is None or name in only

    return Settings(_check(src) if wanted("check") else CheckSettings(),
                    _gc(src) if wanted("gc") else GcSettings(),
                    _health(src) if wanted("health") else HealthSettings(),
                    _trust(src) if wanted("trust") else TrustSettings(),
                    _network(src) if wanted("network") else None)
