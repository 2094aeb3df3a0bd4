"""LVM through its JSON reports (read) and the one runner (write).

>>> lvs = parse_lvs(SAMPLE_LVS)
>>> [(lv.name, lv.is_thin_pool, lv.read_only, lv.skip_activation) for lv in lvs][:2]
[('pool', True, False, False), ('node-1.0-1', False, True, True)]
>>> lvs[2].origin, sorted(lvs[2].tags), lvs[0].data_percent
('node-1.0-1', ['imgbase:layer'], 12.5)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..run import run

TAG_VG = "imgbase:vg"
TAG_POOL = "imgbase:pool"
TAG_BASE = "imgbase:base"
TAG_LAYER = "imgbase:layer"
TAG_VOLUME = "imgbase:volume"

LV_FIELDS = ("lv_name,vg_name,lv_attr,lv_size,pool_lv,origin,lv_tags,data_percent,"
             "metadata_percent,lv_profile,seg_monitor")

SAMPLE_LVS = """{"report": [{"lv": [
 {"lv_name":"pool", "vg_name":"node", "lv_attr":"twi-aotz--", "lv_size":"10737418240",
  "pool_lv":"", "origin":"", "lv_tags":"imgbase:pool", "data_percent":"12.50",
  "metadata_percent":"3.00"},
 {"lv_name":"node-1.0-1", "vg_name":"node", "lv_attr":"Vri---tz-k", "lv_size":"4294967296",
  "pool_lv":"pool", "origin":"", "lv_tags":"imgbase:base", "data_percent":"",
  "metadata_percent":""},
 {"lv_name":"node-1.0-1+1", "vg_name":"node", "lv_attr":"Vwi-aotz--", "lv_size":"4294967296",
  "pool_lv":"pool", "origin":"node-1.0-1", "lv_tags":"imgbase:layer", "data_percent":"9.1",
  "metadata_percent":""}
]}]}"""


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    vg: str
    attr: str
    size: int
    pool: str
    origin: str
    tags: frozenset[str]
    data_percent: float | None
    metadata_percent: float | None
    profile: str = ""  # the LVM metadata profile attached (a pool's autoextend policy)
    monitored: bool = False  # dmeventd watches it (a pool: autoextend can happen)

    @property
    def path(self) -> str:
        return f"/dev/{self.vg}/{self.name}"

    @property
    def is_thin_pool(self) -> bool:
        return self.attr[0] == "t"

    @property
    def read_only(self) -> bool:
        return self.attr[1] == "r"

    @property
    def active(self) -> bool:
        return self.attr[4] == "a"

    @property
    def open(self) -> bool:
        return len(self.attr) > 5 and self.attr[5] == "o"

    @property
    def skip_activation(self) -> bool:
        return len(self.attr) > 9 and self.attr[9] == "k"


def _pct(text: str) -> float | None:
    return float(text) if text.strip() else None


def parse_lvs(text: str) -> list[LogicalVolume]:
    """Parse ``lvs --reportformat json --units b --nosuffix -o LV_FIELDS``."""
    rows = json.loads(text)["report"][0]["lv"]
    return [
        LogicalVolume(
            name=r["lv_name"], vg=r["vg_name"], attr=r["lv_attr"], size=int(r["lv_size"]),
            pool=r["pool_lv"], origin=r["origin"],
            tags=frozenset(t for t in r["lv_tags"].split(",") if t),
            data_percent=_pct(r["data_percent"]), metadata_percent=_pct(r["metadata_percent"]),
            profile=r.get("lv_profile", ""), monitored=r.get("seg_monitor") == "monitored",
        )
        for r in rows
    ]


def lvs(vg: str | None = None) -> list[LogicalVolume]:
    argv = ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LV_FIELDS]
    return parse_lvs(run([*argv, *([vg] if vg else [])]).stdout)


def vgs_with_tag(tag: str) -> list[str]:
    """Names of volume groups carrying ``tag``.

    >>> _vg_rows('{"report":[{"vg":[{"vg_name":"node","vg_tags":"imgbase:vg",'
    ...          '"vg_free":"1024"}]}]}', "imgbase:vg")
    {'node': 1024}
    """
    return list(vg_free_with_tag(tag))


def vg_free_with_tag(tag: str) -> dict[str, int]:
    """Volume groups carrying ``tag``, with their free bytes (one vgs call)."""
    out = run(["vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
               "-o", "vg_name,vg_tags,vg_free"]).stdout
    return _vg_rows(out, tag)


def _vg_rows(text: str, tag: str) -> dict[str, int]:
    rows = json.loads(text)["report"][0]["vg"]
    return {r["vg_name"]: int(r["vg_free"]) for r in rows if tag in r["vg_tags"].split(",")}
