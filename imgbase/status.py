"""`imgbase status`: the node's bases, layers, pool and volumes.

``status --json`` is the machine interface (schema: docs/status.schema.json,
``schema_version`` bumps on incompatible change); the text form is for people.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import die
from .naming import Layer
from .run import run
from .storage import lvm

SCHEMA_VERSION = 1
GRUBENV = Path("/boot/grub/grubenv")


def read_grubenv(path: Path = GRUBENV) -> dict[str, str]:
    """Variables of a grubenv block (``#`` padding ignored).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "grubenv"
    >>> _ = p.write_text("# GRUB Environment Block\\nsaved_entry=n-1-1+1\\n" + "#" * 40)
    >>> read_grubenv(p)
    {'saved_entry': 'n-1-1+1'}
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    env = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key] = value
    return env


def _booted_device() -> str:
    source = run(["findmnt", "-n", "-o", "SOURCE", "/"]).stdout.strip()
    return os.path.realpath(source)


def collect() -> dict[str, Any]:
    vgs = lvm.vgs_with_tag(lvm.TAG_VG)
    if not vgs:
        die("this is not an imgbase node (no volume group tagged imgbase:vg)",
            hint="install one with imgbase install, or adopt one with imgbase layout --init")
    vg = vgs[0]
    lvs = lvm.lvs(vg)
    booted = _booted_device()
    env = read_grubenv()
    layers = []
    for lv in sorted((lv for lv in lvs if lvm.TAG_LAYER in lv.tags),
                     key=lambda lv: (Layer.parse(lv.name).nvr, Layer.parse(lv.name).index)):
        layers.append({
            "name": lv.name, "base": lv.origin, "active": lv.active,
            "booted": lv.active and os.path.realpath(lv.path) == booted,
            "default": env.get("saved_entry") == lv.name,
            "next_boot": env.get("next_entry") == lv.name,
            "data_percent": lv.data_percent, "size": lv.size,
        })
    bases = [{"name": lv.name, "read_only": lv.read_only, "active": lv.active,
              "activation_skip": lv.skip_activation, "size": lv.size,
              "layers": [la["name"] for la in layers if la["base"] == lv.name]}
             for lv in lvs if lvm.TAG_BASE in lv.tags]
    pools = [lv for lv in lvs if lvm.TAG_POOL in lv.tags]
    pool = pools[0] if pools else None
    free = json.loads(run(["vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
                           "-o", "vg_free", vg]).stdout)["report"][0]["vg"][0]["vg_free"]
    return {
        "schema_version": SCHEMA_VERSION,
        "vg": vg,
        "booted_layer": next((la["name"] for la in layers if la["booted"]), None),
        "default_layer": env.get("saved_entry"),
        "next_boot_layer": env.get("next_entry") or None,
        "bases": bases,
        "layers": layers,
        "pool": None if pool is None else {
            "name": pool.name, "size": pool.size, "data_percent": pool.data_percent,
            "metadata_percent": pool.metadata_percent},
        "volumes": [{"name": lv.name, "size": lv.size, "data_percent": lv.data_percent}
                    for lv in lvs if lvm.TAG_VOLUME in lv.tags],
        "vg_free": int(free),
    }


def render(status: dict[str, Any]) -> str:
    lines = [f"volume group {status['vg']}, free {status['vg_free'] / (1 << 30):.1f} GiB"]
    pool = status["pool"]
    if pool:
        lines.append(f"pool {pool['name']}: data {pool['data_percent']}%, "
                     f"metadata {pool['metadata_percent']}%")
    for base in status["bases"]:
        lines.append(f"base {base['name']}{' (read-only)' if base['read_only'] else ''}")
        for layer in status["layers"]:
            if layer["base"] == base["name"]:
                marks = [m for m in ("booted", "default", "next_boot") if layer[m]]
                lines.append(f"  layer {layer['name']}"
                             + (f"  [{', '.join(marks)}]" if marks else ""))
    for vol in status["volumes"]:
        lines.append(f"volume {vol['name']}: {vol['size'] / (1 << 30):.1f} GiB, "
                     f"{vol['data_percent']}% used")
    return "\n".join(lines)
