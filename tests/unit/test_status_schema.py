"""The documented status schema accepts a real status and rejects a broken one."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.conftest import ROOT

SCHEMA = json.loads((ROOT / "docs/status.schema.json").read_text())
GOOD = {
    "schema_version": 1, "vg": "imgbase", "booted_layer": "n-1-1+1", "default_layer": "n-1-1+1",
    "next_boot_layer": None, "next_boot_rescue": None, "rescue_boot": None, "vg_free": 0,
    "bases": [{"name": "n-1-1", "read_only": True, "active": False, "activation_skip": True,
               "size": 1, "layers": ["n-1-1+1"], "signed_by": "0123456789ABCDEF0123",
               "rescue_entry": True}],
    "layers": [{"name": "n-1-1+1", "base": "n-1-1", "active": True, "booted": True,
                "default": True, "next_boot": False, "boot_entry": True, "kargs": ["rw"],
                "tries_left": None, "last_health": {"time": 1, "good": True, "reason": "ok"},
                "data_percent": 1.5,
                "size": 1}],
    "pool": {"name": "pool", "size": 1, "data_percent": 5.0, "metadata_percent": 1.0},
    "volumes": [{"name": "var", "mountpoint": "/var", "size": 1, "data_percent": None}],
    "incomplete": [], "retired": [], "fallback_layer": None,
    "abandoned": [{"time": 1, "layer": "n-1-2+1", "reason": "unhealthy: units: x"}],
    "network": {"interfaces": [
        {"name": "ens3", "kind": "ether", "mac": "52:54:00:12:34:56", "state": "UP",
         "master": "br0", "addresses": []},
        {"name": "br0", "kind": "bridge", "mac": "aa:bb:cc:dd:ee:ff", "state": "UP",
         "master": None, "addresses": ["10.0.2.15/24"]}],
        "bridges": [{"name": "br0", "ports": ["ens3"], "addresses": ["10.0.2.15/24"]}]},
}


def test_schema_accepts_a_status() -> None:
    jsonschema.validate(GOOD, SCHEMA)


@pytest.mark.parametrize("broken", [
    {**GOOD, "schema_version": 2},
    {**GOOD, "extra": 1},
    {k: v for k, v in GOOD.items() if k != "network"},
    {**GOOD, "network": {"interfaces": [], "bridges": [{"name": "br0", "ports": "ens3",
                                                       "addresses": []}]}},
    {k: v for k, v in GOOD.items() if k != "booted_layer"},
    {**GOOD, "layers": [{**GOOD["layers"][0], "name": "no-index"}]},  # type: ignore[dict-item]
    {**GOOD, "bases": [{k: v for k, v in GOOD["bases"][0].items()  # type: ignore[attr-defined]
                        if k != "signed_by"}]},
    {**GOOD, "bases": [{**GOOD["bases"][0], "signed_by": "not hex"}]},  # type: ignore[dict-item]
])
def test_schema_rejects_broken_status(broken: dict[str, object]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_status_names_each_bases_signing_key() -> None:
    from imgbase.node.status import collect, render
    from tests.unit.test_node_plans import NVR, lv, node

    signed = lv("n-2.0-1", "Vri---tz-k", tags="imgbase:base,imgbase:key:0123ABCD0123ABCD")
    st = collect(node(signed), [])
    assert {b["name"]: b["signed_by"] for b in st["bases"]} == {
        NVR: None, "n-2.0-1": "0123ABCD0123ABCD"}
    jsonschema.validate(st, SCHEMA)
    assert "base n-2.0-1 (read-only), signed by 0123ABCD0123ABCD" in render(st)
