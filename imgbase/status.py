"""`imgbase status`: the node's bases, layers, pool and volumes.

``status --json`` is the machine interface (schema: docs/status.schema.json,
``schema_version`` bumps on incompatible change); the text form is for people.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import bootloader
from .errors import die
from .run import run
from .storage.layout import TAG_INCOMPLETE, TAG_RETIRED, NodeLayout, mountpoint_of

SCHEMA_VERSION = 1
BOOT = Path("/boot")
FSTAB = Path("/etc/fstab")


def boot_unmounted(fstab: str, boot: Path, mounted: bool) -> str | None:
    """Why /boot must not be written: fstab mounts a filesystem there and none is
    (what is there is the root's own directory, which GRUB never reads).

    >>> boot_unmounted("LABEL=boot /boot ext4 defaults 0 2\\n", Path("/boot"), False)
    '/boot is not mounted (/etc/fstab mounts LABEL=boot there)'
    >>> boot_unmounted("LABEL=boot /boot ext4 defaults 0 2\\n", Path("/boot"), True)
    >>> boot_unmounted("/dev/vg/a+1 / ext4 defaults 0 1\\n", Path("/boot"), False)
    """
    if mounted:
        return None
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") \
                and os.path.normpath(fields[1]) == os.path.normpath(boot):
            return f"{boot} is not mounted ({FSTAB} mounts {fields[0]} there)"
    return None


@dataclass(frozen=True)
class NodeFacts:
    """What the node's planners and checks need: the layout and the boot state."""

    layout: NodeLayout
    booted: str | None  # the layer mounted as /
    env: dict[str, str]  # grubenv
    entries: dict[str, str]  # grub menu entries by id
    boot: Path = BOOT
    unmounted: str | None = None  # /boot should be a mount of its own and is not: why
    menu_problem: str | None = None  # why the menu may not be what GRUB reads (None: it is)

    @classmethod
    def gather(cls, boot: Path = BOOT, layout: NodeLayout | None = None,
               fstab: Path = FSTAB) -> NodeFacts:
        layout = layout or NodeLayout.discover()
        root = os.path.realpath(run(["findmnt", "-n", "-o", "SOURCE", "/"]).stdout.strip())
        booted = next((lv.name for lv in layout.layers
                       if lv.active and os.path.realpath(lv.path) == root), None)
        entries, problem = bootloader.read_menu(boot)
        unmounted = boot_unmounted(fstab.read_text() if fstab.is_file() else "", boot,
                                   os.path.ismount(boot))
        return cls(layout, booted, bootloader.read_grubenv(boot / "grub/grubenv"),
                   entries, boot, unmounted, problem)

    def need_boot(self) -> None:
        """Refuse (a verb that writes /boot) when /boot is not mounted: the write would land
        in the root's directory, and GRUB would never see it."""
        if self.unmounted:
            die(self.unmounted, hint=f"mount {self.boot}, then run this again")

    def need_menu(self) -> None:
        """Refuse (a planner that removes what the menu does not name) unless /boot is
        mounted and its menu reads as imgbase wrote it."""
        self.need_boot()
        if self.menu_problem:
            die(f"cannot read the boot menu: {self.menu_problem}",
                hint="nothing was removed; imgbase check and imgbase boot show the menu; "
                     "repair it (imgbase kargs, boot --set-default), then run this again")

    @property
    def default(self) -> str | None:
        return self.env.get("saved_entry") or None

    @property
    def booted_base(self) -> str | None:
        lv = self.layout.get(self.booted) if self.booted else None
        return lv.origin if lv else None


def _last_health(history: list[dict[str, Any]], layer: str) -> dict[str, Any] | None:
    last = next((h for h in reversed(history)
                 if h.get("event") == "health" and h.get("layer") == layer), None)
    return None if last is None else {k: last.get(k) for k in ("time", "good", "reason")}


def signed_by(tags: frozenset[str]) -> str | None:
    """The fingerprint of the key a base's image was signed with (its imgbase:key: tag);
    None: accepted unsigned (--insecure), or made before bases were tagged.

    >>> signed_by(frozenset({"imgbase:base", "imgbase:key:AB12"})), signed_by(frozenset())
    ('AB12', None)
    """
    from .trust import KEY_TAG

    return next((t.removeprefix(KEY_TAG) for t in sorted(tags) if t.startswith(KEY_TAG)), None)


def collect(facts: NodeFacts | None = None,
            history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    from .health import read_history

    f = facts or NodeFacts.gather()
    history = read_history() if history is None else history
    layout = f.layout
    trial = f.default if f.env.get("imgbase_tries") else None
    layers = [{
        "name": lv.name, "base": lv.origin, "active": lv.active,
        "booted": lv.name == f.booted, "default": f.default == lv.name,
        "next_boot": f.env.get("next_entry") == lv.name, "boot_entry": lv.name in f.entries,
        "kargs": (bootloader.kernel_args(f.entries[lv.name]).split()
                  if lv.name in f.entries else []),
        "tries_left": int(f.env["imgbase_tries"]) if lv.name == trial else None,
        "last_health": _last_health(history, lv.name),
        "data_percent": lv.data_percent, "size": lv.size,
    } for lv in layout.layers]
    bases = [{"name": lv.name, "read_only": lv.read_only, "active": lv.active,
              "activation_skip": lv.skip_activation, "size": lv.size,
              "layers": [la["name"] for la in layers if la["base"] == lv.name],
              "signed_by": signed_by(lv.tags)}
             for lv in layout.bases]
    pool = layout.pool
    return {
        "schema_version": SCHEMA_VERSION,
        "vg": layout.vg,
        "booted_layer": f.booted,
        "default_layer": f.default,
        "next_boot_layer": f.env.get("next_entry") or None,
        "bases": bases,
        "layers": layers,
        "pool": None if pool is None else {
            "name": pool.name, "size": pool.size, "data_percent": pool.data_percent,
            "metadata_percent": pool.metadata_percent},
        "volumes": [{"name": lv.name, "mountpoint": mountpoint_of(lv), "size": lv.size,
                     "data_percent": lv.data_percent} for lv in layout.volumes],
        "incomplete": sorted(lv.name for lv in layout.tagged(TAG_INCOMPLETE)),
        "retired": sorted(lv.name for lv in layout.tagged(TAG_RETIRED)),
        "fallback_layer": f.env.get("imgbase_fallback") or None,
        "abandoned": [{k: h.get(k) for k in ("time", "layer", "reason")}
                      for h in history if h.get("event") == "abandoned"],
        "vg_free": layout.vg_free,
    }


def render(status: dict[str, Any]) -> str:
    lines = [f"volume group {status['vg']}, free {status['vg_free'] / (1 << 30):.1f} GiB"]
    pool = status["pool"]
    if pool:
        lines.append(f"pool {pool['name']}: {pool['size'] / (1 << 30):.1f} GiB, data "
                     f"{pool['data_percent']}%, metadata {pool['metadata_percent']}%")
    for base in status["bases"]:
        lines.append(f"base {base['name']}{' (read-only)' if base['read_only'] else ''}, "
                     + (f"signed by {base['signed_by']}" if base["signed_by"] else "unsigned"))
        for layer in status["layers"]:
            if layer["base"] == base["name"]:
                marks = [m for m in ("booted", "default", "next_boot") if layer[m]]
                if layer["tries_left"] is not None:
                    marks.append(f"on trial, {layer['tries_left']} boots left")
                if layer["last_health"] and not layer["last_health"]["good"]:
                    marks.append(f"unhealthy: {layer['last_health']['reason']}")
                if not layer["boot_entry"]:
                    marks.append("no boot entry")
                lines.append(f"  layer {layer['name']}"
                             + (f"  [{', '.join(marks)}]" if marks else ""))
    for vol in status["volumes"]:
        lines.append(f"volume {vol['name']} on {vol['mountpoint']}: "
                     f"{vol['size'] / (1 << 30):.1f} GiB, {vol['data_percent']}% used")
    for event in status["abandoned"][-3:]:
        lines.append(f"abandoned {event['layer']}: {event['reason']}")
    for key, what in (("incomplete", "left by an interrupted operation"),
                      ("retired", "no longer booted")):
        if status[key]:
            lines.append(f"{what}: {', '.join(status[key])} (imgbase recover removes them)")
    return "\n".join(lines)
