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
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # a group, a node id (an etcd user)
FILES = ("ca", "cert", "key", "password_file")


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
    user: str | None = None
    password_file: str | None = None
    insecure_http: bool = False

    def password(self) -> str | None:
        """The etcd password, read from its file (None: no user)."""
        if self.password_file is None:
            return None
        try:
            return Path(self.password_file).read_text().strip()
        except OSError as exc:
            die(f"password_file {self.password_file}: {exc.strerror}",
                hint="imgbase fleet add-node wrote it; install --join puts it on the node")


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


def parse(text: str, path: Path, cmdline: str = "", files_exist: bool = False) -> AgentConfig:
    """Validate the file's text (plus command-line overrides) into an AgentConfig.

    ``files_exist``: the agent's check at its start: the TLS files and the password file
    exist, and an https cluster names the node's etcd user. Not when the file is written
    for another root (``install --join`` asks for the user itself; a kickstart's site
    file may leave it to be added on the node)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        die(f"{path}: {exc}", hint="fix the TOML syntax")
    known = {"cluster": {"endpoints", "group", *FILES, "user", "insecure_http"},
             "agent": {"ttl", "backoff_max", "domains", "migrate_hook", "fleetlock"}}
    for section, table in doc.items():
        if section not in known or not isinstance(table, dict):
            die(f"{path}: unknown section [{section}]", hint="known: [cluster], [agent]")
        for key in table:
            if key not in known[section]:
                die(f"{path}: [{section}] has no setting {key!r}",
                    hint=f"known: {', '.join(sorted(known[section]))}")
    cluster, agent = doc.get("cluster", {}), doc.get("agent", {})
    insecure = cluster.get("insecure_http", False)
    if not isinstance(insecure, bool):
        die(f"{path}: [cluster] insecure_http = {insecure!r} is not true or false",
            hint="insecure_http = false")
    endpoints = cluster.get("endpoints", [])
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not isinstance(endpoints, list):
        die(f"{path}: [cluster] endpoints is not a list", hint='endpoints = ["https://..."]')
    for e in endpoints:
        check_endpoint(e, str(path), insecure)
    over = cmdline_overrides(cmdline)
    for e in over.get("endpoints", []):  # never a downgrade: https only from the cmdline
        check_endpoint(e, "the kernel command line", False)
    endpoints = over.get("endpoints", endpoints)
    if not endpoints:
        die(f"{path}: no [cluster] endpoints, and none on the kernel command line",
            hint='endpoints = ["https://etcd.example.org:2379"], or '
            "imgbase.agent.endpoints=... on the kernel command line")
    group = check_name(over.get("group", cluster.get("group", "default")), "group",
                       str(path))
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
    ca, cert, key, password_file = (
        _file(_str(cluster, k, path, "cluster"), k, str(path), files_exist) for k in FILES)
    if bool(cert) != bool(key):
        die(f"{path}: [cluster] cert and key go together", hint="give both, or neither")
    user = _str(cluster, "user", path, "cluster")
    if user is not None:
        check_name(user, "user", str(path))
    if bool(user) != bool(password_file):
        die(f"{path}: [cluster] user and password_file go together",
            hint="give both (imgbase fleet add-node makes them), or neither")
    if files_exist and not insecure and not user:  # the agent's check, at its start
        die(f"{path}: [cluster] has no user: the cluster's etcd has auth on",
            hint='user = "NODE" and password_file = "/etc/imgbase/agent/etcd-password"; '
            "no auth only with insecure_http = true")
    hook = _file(_str(agent, "migrate_hook", path, "agent"), "migrate_hook", str(path),
                 files_exist)
    if domains == "migrate" and not hook:
        die(f"{path}: [agent] domains = \"migrate\" needs a migrate_hook",
            hint='migrate_hook = "/etc/imgbase/agent/migrate"')
    fleetlock = _str(agent, "fleetlock", path, "agent")
    if fleetlock is not None:
        check_endpoint(fleetlock, f"{path}: [agent] fleetlock", insecure)
    return AgentConfig(tuple(endpoints), group, ca, cert, key, ttl, float(backoff), domains,
                       hook, fleetlock, user, password_file, insecure)


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


def toml_string(value: str) -> str:
    r"""A TOML basic string: quotes, backslashes and every control character escaped.

    >>> print(toml_string('g"\nmigrate_hook = "/x\\y\x7f'))
    "g\"\nmigrate_hook = \"/x\\y\u007F"
    >>> import tomllib; s = 'a"\\\n\t\x00\x1f\x7fé'
    >>> tomllib.loads(f"k = {toml_string(s)}")["k"] == s
    True
    """
    short = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
             "\f": "\\f", "\r": "\\r"}
    out = []
    for c in value:
        if c in short:
            out.append(short[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def dump(tables: dict[str, dict[str, str | bool | list[str]]], comment: str = "") -> str:
    """TOML for tables of strings, booleans and lists of strings (every string escaped).

    >>> print(dump({"cluster": {"endpoints": ["https://e:2379"], "insecure_http": False}}))
    [cluster]
    endpoints = ["https://e:2379"]
    insecure_http = false
    <BLANKLINE>
    """
    def value(v: str | bool | list[str]) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(toml_string(x) for x in v) + "]"
        return toml_string(v)

    lines = [f"# {comment}"] if comment else []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def render(endpoints: list[str], group: str = "default", ca: str | None = None,
           cert: str | None = None, key: str | None = None, user: str | None = None,
           password_file: str | None = None, insecure_http: bool = False,
           comment: str = "written by imgbase install --join; see docs/agent.md",
           where: str = "agent.toml") -> str:
    """The file `imgbase install --join` (and the kickstart) writes: every value checked
    by the agent's own parser, the text written by :func:`dump`, and read back to the same
    values before it is returned."""
    cluster: dict[str, str | bool | list[str]] = {"endpoints": list(endpoints), "group": group}
    for k, v in (("ca", ca), ("cert", cert), ("key", key), ("user", user),
                 ("password_file", password_file)):
        if v:
            cluster[k] = v
    if insecure_http:
        cluster["insecure_http"] = True
    text = dump({"cluster": cluster}, comment)
    parsed = parse(text, Path(where))
    want = AgentConfig(tuple(endpoints), group, ca or None, cert or None, key or None,
                       user=user or None, password_file=password_file or None,
                       insecure_http=insecure_http)
    if parsed != want:  # the writer and the reader disagree: never write it
        raise AssertionError(f"agent.toml does not read back: {parsed} != {want}")
    return text
