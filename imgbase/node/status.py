"""`imgbase status`: the node's bases, layers, pool, volumes and network.

``status --json`` is the machine interface (schema: docs/status.schema.json,
``schema_version`` bumps on incompatible change); the text form is for people.
"""

from __future__ import annotations

import json
from typing import Any

from .. import bootloader
from ..bootloader.grub import rescue_base
from ..run import run
from ..storage.layout import TAG_INCOMPLETE, TAG_RETIRED, mountpoint_of
from .facts import NodeFacts

SCHEMA_VERSION = 1


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
    from ..image.trust import KEY_TAG

    return next((t.removeprefix(KEY_TAG) for t in sorted(tags) if t.startswith(KEY_TAG)), None)


def network(links: list[dict[str, Any]]) -> dict[str, Any]:
    """The node's interfaces (from ``ip -j -d addr``) and its bridges with their ports.

    >>> n = network([{"ifname": "lo", "link_type": "loopback"},
    ...     {"ifname": "ens3", "link_type": "ether", "address": "52:54:00:12:34:56",
    ...      "operstate": "UP", "master": "br0", "addr_info": []},
    ...     {"ifname": "br0", "link_type": "ether", "address": "aa:bb:cc:dd:ee:ff",
    ...      "operstate": "UP", "linkinfo": {"info_kind": "bridge"},
    ...      "addr_info": [{"local": "10.0.2.15", "prefixlen": 24, "scope": "global"},
    ...                    {"local": "fe80::1", "prefixlen": 64, "scope": "link"}]}])
    >>> n["bridges"]
    [{'name': 'br0', 'ports': ['ens3'], 'addresses': ['10.0.2.15/24']}]
    >>> [(i["name"], i["kind"], i["master"]) for i in n["interfaces"]]
    [('ens3', 'ether', 'br0'), ('br0', 'bridge', None)]
    """
    interfaces = [{
        "name": link["ifname"],
        "kind": (link.get("linkinfo") or {}).get("info_kind") or link.get("link_type"),
        "mac": link.get("address"), "state": link.get("operstate"),
        "master": link.get("master"),
        "addresses": [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                      if a.get("scope") == "global"],
    } for link in links if link.get("link_type") != "loopback"]
    bridges = [{"name": i["name"], "ports": [p["name"] for p in interfaces
                                             if p["master"] == i["name"]],
                "addresses": i["addresses"]} for i in interfaces if i["kind"] == "bridge"]
    return {"interfaces": interfaces, "bridges": bridges}


def _links() -> list[dict[str, Any]]:
    links: list[dict[str, Any]] = json.loads(run(["ip", "-j", "-d", "addr", "show"]).stdout)
    return links


def collect(facts: NodeFacts | None = None,
            history: list[dict[str, Any]] | None = None,
            links: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    from .health import read_history

    f = facts or NodeFacts.gather()
    history = read_history() if history is None else history
    layout = f.layout
    trial = f.default if f.env.get("imgbase_tries") else None
    next_entry = f.env.get("next_entry") or None
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
              "signed_by": signed_by(lv.tags), "rescue_entry": lv.name in f.rescue}
             for lv in layout.bases]
    pool = layout.pool
    return {
        "schema_version": SCHEMA_VERSION,
        "vg": layout.vg,
        "booted_layer": f.booted,
        "default_layer": f.default,
        "next_boot_layer": next_entry if next_entry in f.entries else None,
        "next_boot_rescue": next((b for b in f.rescue if b == rescue_base(next_entry or "")),
                                 None),
        "rescue_boot": f.rescued,
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
        "network": network(_links() if links is None else links),
    }


def render(status: dict[str, Any]) -> str:
    lines = [f"volume group {status['vg']}, free {status['vg_free'] / (1 << 30):.1f} GiB"]
    if status["rescue_boot"]:
        lines.insert(0, f"RESCUE SYSTEM of base {status['rescue_boot']}: / is the base under "
                        "a tmpfs overlay, changes to it are lost at the next boot")
    pool = status["pool"]
    if pool:
        lines.append(f"pool {pool['name']}: {pool['size'] / (1 << 30):.1f} GiB, data "
                     f"{pool['data_percent']}%, metadata {pool['metadata_percent']}%")
    for base in status["bases"]:
        lines.append(f"base {base['name']}{' (read-only)' if base['read_only'] else ''}, "
                     + (f"signed by {base['signed_by']}" if base["signed_by"] else "unsigned")
                     + ("" if base["rescue_entry"] else ", no rescue entry")
                     + (", rescue next boot" if status["next_boot_rescue"] == base["name"]
                        else ""))
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
    for bridge in status["network"]["bridges"]:
        lines.append(f"bridge {bridge['name']}: {', '.join(bridge['addresses']) or 'no address'}"
                     f"; ports {', '.join(bridge['ports']) or 'none'}")
    for event in status["abandoned"][-3:]:
        lines.append(f"abandoned {event['layer']}: {event['reason']}")
    for key, what in (("incomplete", "left by an interrupted operation"),
                      ("retired", "no longer booted")):
        if status[key]:
            lines.append(f"{what}: {', '.join(status[key])} (imgbase recover removes them)")
    return "\n".join(lines)
