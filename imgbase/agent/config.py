"""The agent's configuration: ``/etc/imgbase/agent.toml``, then the kernel command line.

A node learns where its cluster is at install time (``imgbase install --join``, or the
kickstart's ``%post``), which writes the file into the node's layer, or at boot from the
kernel command line (``imgbase.agent.endpoints=https://10.0.0.1:2379,https://10.0.0.2:2379``
and ``imgbase.agent.group=rack1``), which wins over the file. The image itself carries no
cluster address and no secrets: TLS material is referenced by path, and is put on the node
at install time.

    [cluster]
    endpoints = ["https://10.0.0.1:2379"]
    group = "default"
    ca = "/etc/imgbase/agent/ca.pem"          # optional: TLS
    cert = "/etc/imgbase/agent/node.pem"      # optional: client certificate ...
    key = "/etc/imgbase/agent/node-key.pem"   # ... and its key
    [agent]
    ttl = 30               # seconds the node's record outlives a silent agent
    backoff_max = 60       # seconds between retries at most, while etcd is unreachable
    domains = "wait"       # before a reboot, running domains: wait | shutdown | migrate
    migrate_hook = ""      # with domains = "migrate": run this, then wait for none left
    fleetlock = ""         # a FleetLock server URL: take reboot slots there, not in etcd

>>> cmdline_overrides("BOOT_IMAGE=/x root=/dev/v/l imgbase.agent.group=r1 "
...                   "imgbase.agent.endpoints=http://a:2379,http://b:2379")
{'group': 'r1', 'endpoints': ['http://a:2379', 'http://b:2379']}
>>> node_id_from("0123456789abcdef0123456789abcdef")
'684b2a34537cde0f7fef3bb0582ddb70'
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import die

CONFIG = Path("/etc/imgbase/agent.toml")
CMDLINE = Path("/proc/cmdline")
MACHINE_ID = Path("/etc/machine-id")
APP_ID = b"imgbase-agent"
DOMAIN_POLICIES = ("wait", "shutdown", "migrate")


@dataclass(frozen=True)
class AgentConfig:
    endpoints: tuple[str, ...]
    group: str = "default"
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    ttl: int = 30
    backoff_max: float = 60.0
    domains: str = "wait"
    migrate_hook: str | None = None
    fleetlock: str | None = None


def node_id_from(machine_id: str) -> str:
    """An application-specific id (HMAC of the machine-id, as systemd recommends): stable
    for the node, without publishing its machine-id."""
    key = bytes.fromhex(machine_id.strip())
    return hmac.new(key, APP_ID, hashlib.sha256).hexdigest()[:32]


def node_id(path: Path = MACHINE_ID) -> str:
    text = path.read_text().strip() if path.exists() else ""
    if len(text) != 32:
        die(f"{path} holds no machine id", hint="systemd-machine-id-setup makes one")
    return node_id_from(text)


def cmdline_overrides(cmdline: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for word in cmdline.split():
        name, _, value = word.partition("=")
        if name == "imgbase.agent.endpoints" and value:
            found["endpoints"] = [e for e in value.split(",") if e]
        elif name == "imgbase.agent.group" and value:
            found["group"] = value
    return found


def _str(table: dict[str, Any], key: str, path: Path, section: str) -> str | None:
    value = table.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        die(f"{path}: [{section}] {key} = {value!r} is not a string", hint=f'{key} = "..."')
    return value


def parse(text: str, path: Path, cmdline: str = "") -> AgentConfig:
    """Validate the file's text (plus command-line overrides) into an AgentConfig."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        die(f"{path}: {exc}", hint="fix the TOML syntax")
    known = {"cluster": {"endpoints", "group", "ca", "cert", "key"},
             "agent": {"ttl", "backoff_max", "domains", "migrate_hook", "fleetlock"}}
    for section, table in doc.items():
        if section not in known or not isinstance(table, dict):
            die(f"{path}: unknown section [{section}]", hint="known: [cluster], [agent]")
        for key in table:
            if key not in known[section]:
                die(f"{path}: [{section}] has no setting {key!r}",
                    hint=f"known: {', '.join(sorted(known[section]))}")
    cluster, agent = doc.get("cluster", {}), doc.get("agent", {})
    cluster = {**cluster, **cmdline_overrides(cmdline)}
    endpoints = cluster.get("endpoints", [])
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not endpoints:
        die(f"{path}: no [cluster] endpoints, and none on the kernel command line",
            hint='endpoints = ["https://etcd.example.org:2379"], or '
            "imgbase.agent.endpoints=... on the kernel command line")
    for e in endpoints:
        if not isinstance(e, str) or urlsplit(e).scheme not in ("http", "https") \
                or not urlsplit(e).hostname:
            die(f"{path}: endpoint {e!r} is not an http(s) URL",
                hint="e.g. https://10.0.0.1:2379")
    group = cluster.get("group", "default")
    if not isinstance(group, str) or not group or "/" in group:
        die(f"{path}: [cluster] group = {group!r} is not a group name",
            hint='a word without "/", e.g. group = "rack1"')
    ttl = agent.get("ttl", 30)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 5 <= ttl <= 3600:
        die(f"{path}: [agent] ttl = {ttl!r} is not 5 to 3600 seconds", hint="ttl = 30")
    backoff = agent.get("backoff_max", 60)
    if not isinstance(backoff, int | float) or isinstance(backoff, bool) or backoff <= 0:
        die(f"{path}: [agent] backoff_max = {backoff!r} is not a number of seconds",
            hint="backoff_max = 60")
    domains = agent.get("domains", "wait")
    if domains not in DOMAIN_POLICIES:
        die(f"{path}: [agent] domains = {domains!r} is not a policy",
            hint=f"one of: {', '.join(DOMAIN_POLICIES)}")
    cert, key = _str(cluster, "cert", path, "cluster"), _str(cluster, "key", path, "cluster")
    if bool(cert) != bool(key):
        die(f"{path}: [cluster] cert and key go together", hint="give both, or neither")
    hook = _str(agent, "migrate_hook", path, "agent")
    if domains == "migrate" and not hook:
        die(f"{path}: [agent] domains = \"migrate\" needs a migrate_hook",
            hint='migrate_hook = "/etc/imgbase/agent/migrate"')
    return AgentConfig(tuple(endpoints), group, _str(cluster, "ca", path, "cluster"), cert, key,
                       ttl, float(backoff), domains, hook, _str(agent, "fleetlock", path, "agent"))


def load(path: Path | None = None, cmdline: Path | None = None) -> AgentConfig:
    path, cmdline = path or CONFIG, cmdline or CMDLINE
    text = path.read_text() if path.exists() else ""
    line = cmdline.read_text() if cmdline.exists() else ""
    if not text and not cmdline_overrides(line):
        die(f"{path} is missing and the kernel command line names no cluster",
            hint="imgbase install --join ENDPOINTS, or write the file")
    return parse(text, path, line)


def render(endpoints: list[str], group: str = "default", ca: str | None = None,
           cert: str | None = None, key: str | None = None) -> str:
    """The file `imgbase install --join` writes (validated by parse before it is written)."""
    lines = ["# written by imgbase install --join; see imgbase/agent/config.py", "[cluster]",
             "endpoints = [" + ", ".join(f'"{e}"' for e in endpoints) + "]",
             f'group = "{group}"']
    lines += [f'{k} = "{v}"' for k, v in (("ca", ca), ("cert", cert), ("key", key)) if v]
    text = "\n".join(lines) + "\n"
    parse(text, Path("agent.toml"))
    return text
