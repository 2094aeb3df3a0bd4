"""The agent's configuration: ``/etc/imgbase/agent.toml``, then the kernel command line.

A node learns where its cluster is at install time (``imgbase install --join``, or the
kickstart's ``%post``), which writes the file into the node's layer, or at boot from the
kernel command line (``imgbase.agent.endpoints=https://10.0.0.1:2379,https://10.0.0.2:2379``
and ``imgbase.agent.group=rack1``), which wins over the file. The image itself carries no
cluster address and no secrets: TLS material and the etcd password are referenced by path,
and are put on the node at install time.

https only: an ``http://`` endpoint is refused unless the *file* says
``insecure_http = true``; the kernel command line may name the group and https endpoints,
never an http one, and never the TLS files, the user or ``insecure_http`` -- so it cannot
downgrade a node to plain HTTP or to another CA. With https, etcd auth is on: the node
logs in as its etcd user (``user``, with the password in ``password_file``), and that user
name is the node's id -- etcd lets it write only its own keys (see
:mod:`imgbase.agent.fleet`), so an id that is not its own gets it nowhere.

    [cluster]
    endpoints = ["https://10.0.0.1:2379"]
    group = "default"
    ca = "/etc/imgbase/agent/ca.pem"          # TLS: the CA of the members' certificates
    cert = "/etc/imgbase/agent/node.pem"      # a client certificate ...
    key = "/etc/imgbase/agent/node-key.pem"   # ... and its key
    user = "node7"                            # the node's etcd user: its node id
    password_file = "/etc/imgbase/agent/etcd-password"
    insecure_http = false                     # true: http endpoints, no auth (a lab)
    [agent]
    ttl = 30               # seconds the node's record outlives a silent agent
    backoff_max = 60       # seconds between retries at most, while etcd is unreachable
    domains = "wait"       # before a reboot, running domains: wait | shutdown | migrate
    migrate_hook = ""      # with domains = "migrate": run this, then wait for none left
    fleetlock = ""         # a FleetLock server URL: take reboot slots there, not in etcd

>>> cmdline_overrides("BOOT_IMAGE=/x root=/dev/v/l imgbase.agent.group=r1 "
...                   "imgbase.agent.endpoints=https://a:2379,https://b:2379")
{'group': 'r1', 'endpoints': ['https://a:2379', 'https://b:2379']}
>>> node_id_from("0123456789abcdef0123456789abcdef")
'684b2a34537cde0f7fef3bb0582ddb70'
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from ..errors import die
from ..tomlconf import Source, Table

CONFIG = Path("/etc/imgbase/agent.toml")
CMDLINE = Path("/proc/cmdline")
MACHINE_ID = Path("/etc/machine-id")
APP_ID = b"imgbase-agent"
DOMAIN_POLICIES = ("wait", "shutdown", "migrate")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # a group, a node id (an etcd user)
FILES = ("ca", "cert", "key", "password_file")


@dataclass(frozen=True)
class Join:
    """Where a node's cluster is and how the node logs in: the one shape of the cluster join,
    whether it comes from agent.toml's ``[cluster]``, ``imgbase install --join``, a kickstart
    site's ``[cluster]`` or the flags of ``imgbase fleet``. TLS files and the password are
    paths (on the node, except for ``fleet``'s own)."""

    endpoints: tuple[str, ...]
    group: str = "default"
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password_file: str | None = None
    insecure_http: bool = False

    def check(self, where: str, files_exist: bool = False, on_node: bool = True) -> Join:
        """Every value checked (errors name ``where``); returns itself. ``on_node``: the
        files are paths on the node, absolute (not so for an admin's ``imgbase fleet``)."""
        for e in self.endpoints:
            check_endpoint(e, where, self.insecure_http)
        check_name(self.group, "group", where)
        for k in FILES:
            if on_node:
                _file(getattr(self, k), k, where, files_exist)
        if bool(self.cert) != bool(self.key):
            die(f"{where}: [cluster] cert and key go together", hint="give both, or neither")
        if self.user is not None:
            check_name(self.user, "user", where)
            if on_node and self.user == "root":
                die(f"{where}: user root is the cluster admin's; a node logs in as its own "
                    "etcd user", hint="imgbase fleet add-node NODE makes the node's user "
                    "and password")
        if bool(self.user) != bool(self.password_file):
            die(f"{where}: [cluster] user and password_file go together",
                hint="give both (imgbase fleet add-node makes them), or neither")
        return self

    def password(self) -> str | None:
        """The etcd password, read from its file (None: no user)."""
        if self.password_file is None:
            return None
        try:
            return Path(self.password_file).read_text().strip()
        except OSError as exc:
            die(f"password_file {self.password_file}: {exc.strerror}",
                hint="imgbase fleet add-node wrote it; install --join puts it on the node")

    def table(self) -> dict[str, Any]:
        """agent.toml's ``[cluster]`` table: the values set, nothing empty."""
        table: dict[str, Any] = {"endpoints": list(self.endpoints), "group": self.group}
        for k in (*FILES[:3], "user", "password_file"):
            if getattr(self, k):
                table[k] = getattr(self, k)
        if self.insecure_http:
            table["insecure_http"] = True
        return table

    def agent_toml(self, comment: str = "written by imgbase install --join; see docs/agent.md",
                   where: str = "agent.toml") -> str:
        """The file install --join and a kickstart's %post write: checked, written by a
        TOML library, and read back to the same join before it is returned."""
        self.check(where)
        text = f"# {comment}\n" + tomli_w.dumps({"cluster": self.table()})
        if parse(text, Path(where)).join != self:  # the writer and the reader disagree
            raise AssertionError(f"agent.toml does not read back as {self}")
        return text


@dataclass(frozen=True)
class AgentConfig:
    """agent.toml: the cluster join and the agent's own settings (``[agent]``)."""

    join: Join
    ttl: int = 30
    backoff_max: float = 60.0
    domains: str = "wait"
    migrate_hook: str | None = None
    fleetlock: str | None = None

    # the join's values, read as the agent's
    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.join.endpoints

    @property
    def group(self) -> str:
        return self.join.group

    @property
    def ca(self) -> str | None:
        return self.join.ca

    @property
    def cert(self) -> str | None:
        return self.join.cert

    @property
    def key(self) -> str | None:
        return self.join.key

    @property
    def user(self) -> str | None:
        return self.join.user

    @property
    def password_file(self) -> str | None:
        return self.join.password_file

    @property
    def insecure_http(self) -> bool:
        return self.join.insecure_http

    def password(self) -> str | None:
        return self.join.password()


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


def check_name(value: object, what: str, where: str) -> str:
    r"""A group or a node id: it goes into etcd keys and role names.

    >>> check_name("rack-1.a", "group", "x")
    'rack-1.a'
    >>> check_name('g"\nmigrate_hook = "/x', "group", "agent.toml")
    Traceback (most recent call last):
    ...
    imgbase.errors.InputError: agent.toml: group 'g"\nmigrate_hook = "/x' is not a name
    """
    if not isinstance(value, str) or not NAME.fullmatch(value):
        die(f"{where}: {what} {value!r} is not a name",
            hint="letters, digits, '.', '_' and '-', at most 63, e.g. rack1")
    return value


def check_endpoint(url: object, where: str, insecure_http: bool) -> str:
    parts = urlsplit(url) if isinstance(url, str) else None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or parts.path not in ("", "/") or parts.query or parts.fragment
            or any(c.isspace() or c in "\"\\" for c in str(url))):
        die(f"{where}: endpoint {url!r} is not an http(s) URL of an etcd member",
            hint="e.g. https://10.0.0.1:2379")
    if parts.scheme == "http" and not insecure_http:
        die(f"{where}: endpoint {url!r} is plain http",
            hint="use https (and ca, cert, key); http only with insecure_http = true in "
            "agent.toml")
    assert isinstance(url, str)
    return url


def _file(value: str | None, key: str, where: str, must_exist: bool) -> str | None:
    if value is None:
        return None
    if not value.startswith("/") or "\n" in value or "/../" in f"{value}/":
        die(f"{where}: [cluster] {key} = {value!r} is not an absolute path",
            hint=f'{key} = "/etc/imgbase/agent/..."')
    if must_exist and not Path(value).is_file():
        die(f"{where}: [cluster] {key} = {value} does not exist",
            hint="imgbase install --join puts the TLS files and the password on the node")
    return value


def _opt_str(src: Source, t: Table, key: str) -> str | None:
    value = t.get(key, str)
    return value or None


def parse(text: str, path: Path, cmdline: str = "", files_exist: bool = False) -> AgentConfig:
    """Validate the file's text (plus command-line overrides) into an AgentConfig.

    ``files_exist``: the agent's check at its start: the TLS files and the password file
    exist, and an https cluster names the node's etcd user. Not when the file is written
    for another root (``install --join`` asks for the user itself; a kickstart's site
    file may leave it to be added on the node)."""
    src = Source(path, text=text)
    Table(src, "", src.data, {"cluster", "agent"})
    cluster = Table(src, "cluster", src.data.get("cluster", {}),
                    {"endpoints", "group", *FILES, "user", "insecure_http"})
    agent = Table(src, "agent", src.data.get("agent", {}),
                  {"ttl", "backoff_max", "domains", "migrate_hook", "fleetlock"})
    where = str(path)
    insecure = cluster.get("insecure_http", bool, False)
    endpoints = cluster.data.get("endpoints", [])
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not isinstance(endpoints, list):
        src.fail("cluster", "endpoints", "[cluster] endpoints is not a list",
                 hint='endpoints = ["https://..."]')
    for e in endpoints:
        check_endpoint(e, f"{path}:{src.line_of('cluster', 'endpoints')}", insecure)
    over = cmdline_overrides(cmdline)
    for e in over.get("endpoints", []):  # never a downgrade: https only from the cmdline
        check_endpoint(e, "the kernel command line", False)
    endpoints = over.get("endpoints", endpoints)
    if not endpoints:
        die(f"{path}: no [cluster] endpoints, and none on the kernel command line",
            hint='endpoints = ["https://etcd.example.org:2379"], or '
            "imgbase.agent.endpoints=... on the kernel command line")
    join = Join(tuple(endpoints), over.get("group", cluster.get("group", str, "default")),
                ca=_opt_str(src, cluster, "ca"), cert=_opt_str(src, cluster, "cert"),
                key=_opt_str(src, cluster, "key"), user=_opt_str(src, cluster, "user"),
                password_file=_opt_str(src, cluster, "password_file"),
                insecure_http=insecure).check(where, files_exist)
    if files_exist and not insecure and not join.user:  # the agent's check, at its start
        die(f"{path}: [cluster] has no user: the cluster's etcd has auth on",
            hint='user = "NODE" and password_file = "/etc/imgbase/agent/etcd-password"; '
            "no auth only with insecure_http = true")
    ttl = agent.get("ttl", int, 30)
    if not 5 <= ttl <= 3600:
        src.fail("agent", "ttl", f"[agent] ttl = {ttl!r} is not 5 to 3600 seconds",
                 hint="ttl = 30")
    backoff = agent.data.get("backoff_max", 60)
    if not isinstance(backoff, int | float) or isinstance(backoff, bool) or backoff <= 0:
        src.fail("agent", "backoff_max", f"[agent] backoff_max = {backoff!r} is not a "
                 "number of seconds", hint="backoff_max = 60")
    domains = agent.get("domains", str, "wait")
    if domains not in DOMAIN_POLICIES:
        src.fail("agent", "domains", f"[agent] domains = {domains!r} is not a policy",
                 hint=f"one of: {', '.join(DOMAIN_POLICIES)}")
    hook = _file(_opt_str(src, agent, "migrate_hook"), "migrate_hook", where, files_exist)
    if domains == "migrate" and not hook:
        src.fail("agent", "domains", "[agent] domains = \"migrate\" needs a migrate_hook",
                 hint='migrate_hook = "/etc/imgbase/agent/migrate"')
    fleetlock = _opt_str(src, agent, "fleetlock")
    if fleetlock is not None:
        check_endpoint(fleetlock, f"{path}: [agent] fleetlock", insecure)
    return AgentConfig(join, ttl, float(backoff), domains, hook, fleetlock)


def load(path: Path | None = None, cmdline: Path | None = None) -> AgentConfig:
    path, cmdline = path or CONFIG, cmdline or CMDLINE
    text = path.read_text() if path.exists() else ""
    line = cmdline.read_text() if cmdline.exists() else ""
    if not text and not cmdline_overrides(line):
        die(f"{path} is missing and the kernel command line names no cluster",
            hint="imgbase install --join ENDPOINTS, or write the file")
    return parse(text, path, line, files_exist=True)


def node_id_of(config: AgentConfig, machine_id: Path = MACHINE_ID) -> str:
    """The node's id: its etcd user (etcd checks it), else one made from the machine-id."""
    return config.user if config.user else node_id(machine_id)
