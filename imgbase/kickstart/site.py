"""Site parameters of a node install kickstart: a small TOML file -> a frozen `Site`.

``imgbase kickstart render --site SITE.toml`` reads it; ``--endpoint``, ``--group``,
``--karg`` and ``--ssh-key`` replace what the file says. Every key is checked here
(unknown keys are refused with the file's name and the key), so that nothing reaches a
kickstart line or the ``%post`` shell unchecked::

    image_url = "http://images.example.org/nodes/"   # a directory (ends in /) or the image
    disk = "vda"                    # optional: the only disk anaconda touches (else all)
    lang = "en_US.UTF-8"
    keyboard = "us"
    timezone = "Etc/UTC"
    kernel_args = ["console=ttyS0,115200"]
    ssh_keys = ["ssh-ed25519 AAAAC3Nza... admin@example.org"]

    [cluster]                       # the agent's join config: /etc/imgbase/agent.toml
    endpoints = ["https://10.0.0.1:2379"]
    group = "rack1"
    ca = "/etc/imgbase/agent/ca.pem"      # TLS material: paths on the node, not the files
    cert = "/etc/imgbase/agent/node.pem"
    key = "/etc/imgbase/agent/node-key.pem"

>>> Site().kernel_args
()
>>> check_karg("console=ttyS0,115200", "--karg")
'console=ttyS0,115200'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..compose.kickstart import check_url
from ..errors import ImgbaseError, die
from ..image.kargs import check_arg
from ..node.agentconfig import Join
from ..tomlconf import Source, Table

WORD_RE = {  # what may stand on a kickstart command line unquoted
    "disk": re.compile(r"^[A-Za-z0-9/_.:+-]+$"),
    "lang": re.compile(r"^[A-Za-z0-9_.@-]+$"),
    "keyboard": re.compile(r"^[A-Za-z0-9_.-]+$"),
    "timezone": re.compile(r"^[A-Za-z0-9_/+-]+$"),
}
SSH_KEY_RE = re.compile(r"^(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+) "
                        r"[A-Za-z0-9+/]+={0,3}( [^\n\r]*)?$")
TOP_KEYS = ("image_url", "disk", "lang", "keyboard", "timezone", "kernel_args", "ssh_keys",
            "cluster")
#: the first line of the agent.toml a kickstart's %post writes
KICKSTART_COMMENT = "written by the imgbase kickstart's %post; see docs/agent.md"
CLUSTER_KEYS = ("endpoints", "group", "ca", "cert", "key", "user", "password_file",
                "insecure_http")


@dataclass(frozen=True)
class Site:
    image_url: str | None = None
    disk: str | None = None
    lang: str = "en_US.UTF-8"
    keyboard: str = "us"
    timezone: str = "Etc/UTC"
    kernel_args: tuple[str, ...] = ()
    ssh_keys: tuple[str, ...] = ()
    cluster: Join | None = None

    def override(self, *, endpoints: list[str] | None = None, group: str | None = None,
                 kernel_args: list[str] | None = None,
                 ssh_keys: list[str] | None = None) -> Site:
        """The site with command-line flags in place of the file's values (a flag given
        replaces the whole list)."""
        site = self
        if kernel_args is not None:
            site = replace(site, kernel_args=tuple(check_karg(a, "--karg")
                                                   for a in kernel_args))
        if ssh_keys is not None:
            site = replace(site, ssh_keys=tuple(k for v in ssh_keys
                                                for k in ssh_keys_of(v, "--ssh-key")))
        if endpoints is not None or group is not None:
            if endpoints is None and site.cluster is None:
                die("--group names the agent's update group, but no cluster is given",
                    hint="add --endpoint URL (or [cluster] endpoints in the site file)")
            base = site.cluster or Join(())
            cluster = replace(base, endpoints=base.endpoints if endpoints is None
                              else tuple(endpoints), group=group or base.group)
            cluster.agent_toml(KICKSTART_COMMENT, "--endpoint/--group")
            site = replace(site, cluster=cluster)
        return site


#: what may stand in a URL on a kickstart line: RFC 3986's characters without those that
#: pykickstart's shlex.split(comments=True) treats specially -- # (the rest of the line is
#: a comment: a liveimg's --checksum would go), quotes, backslash -- and no whitespace


def check_karg(arg: str, where: str) -> str:
    """A kernel argument that can go into a boot entry (:func:`imgbase.image.kargs.check_arg`)."""
    try:
        return check_arg(arg)
    except ImgbaseError as exc:
        die(f"{where}: {exc.message}", hint=exc.hint)


def ssh_keys_of(value: str, where: str) -> list[str]:
    """SSH public keys from a key line, or from a file of them (``~/.ssh/id_ed25519.pub``)."""
    lines = [value]
    if not SSH_KEY_RE.match(value.strip()) and Path(value).is_file():
        lines = [line.strip() for line in Path(value).read_text().splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
        where = f"{where} {value}"
    for line in lines:
        if not SSH_KEY_RE.match(line.strip()):
            die(f"{where}: {line[:40]!r} is not an SSH public key",
                hint="one key per entry, as in authorized_keys: TYPE BASE64 [COMMENT]")
    return [line.strip() for line in lines]


def _word(src: Source, t: Table, key: str) -> str | None:
    value: str | None = t.get(key, str)
    if value is not None and not WORD_RE[key].match(value):
        src.fail("", key, f"{key} = {value!r} cannot stand on a kickstart line",
                 hint=f"a single word matching {WORD_RE[key].pattern}")
    return value


def _strings(t: Table, key: str) -> tuple[str, ...]:
    values = t.get(key, list, [])
    if not all(isinstance(v, str) for v in values):
        t.src.fail(t.name, key, f"{key} must be a list of strings", hint=f'{key} = ["..."]')
    return tuple(values)


def _node_path(src: Source, t: Table, key: str) -> str | None:
    value: str | None = t.get(key, str)
    if value is not None and (not value.startswith("/") or re.search(r"[\s'\"\\$`]", value)):
        src.fail("cluster", key, f"cluster.{key} = {value!r} is not an absolute path on the "
                 "node", hint="TLS material is referenced by path (e.g. "
                 "/etc/imgbase/agent/ca.pem) and put on the node separately; the kickstart "
                 "carries no secrets")
    return value


def parse_site(text: str, path: Path) -> Site:
    src = Source(path, text=text)
    top = Table(src, "", src.data, set(TOP_KEYS))
    cluster = None
    if "cluster" in src.data:
        t = Table(src, "cluster", src.data["cluster"], set(CLUSTER_KEYS))
        cluster = Join(_strings(t, "endpoints"), t.get("group", str, "default"),
                       ca=_node_path(src, t, "ca"), cert=_node_path(src, t, "cert"),
                       key=_node_path(src, t, "key"), user=t.get("user", str) or None,
                       password_file=_node_path(src, t, "password_file"),
                       insecure_http=t.get("insecure_http", bool, False))
        cluster.agent_toml(KICKSTART_COMMENT, str(path))
    image_url = top.get("image_url", str)
    if image_url is not None:
        check_url(image_url, f"{path}: image_url")
    return Site(
        image_url=image_url,
        disk=_word(src, top, "disk"),
        lang=_word(src, top, "lang") or Site.lang,
        keyboard=_word(src, top, "keyboard") or Site.keyboard,
        timezone=_word(src, top, "timezone") or Site.timezone,
        kernel_args=tuple(check_karg(a, f"{path}: kernel_args")
                          for a in _strings(top, "kernel_args")),
        ssh_keys=tuple(k for v in _strings(top, "ssh_keys") for k in _ssh_key_line(v, path)),
        cluster=cluster,
    )


def _ssh_key_line(value: str, path: Path) -> list[str]:
    if not SSH_KEY_RE.match(value.strip()):
        die(f"{path}: ssh_keys: {value[:40]!r} is not an SSH public key",
            hint="one key per entry, as in authorized_keys: TYPE BASE64 [COMMENT]")
    return [value.strip()]


def load_site(path: Path) -> Site:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        die(f"{path}: no such site file", hint="see docs/kickstart.md for its keys")
    except (OSError, UnicodeDecodeError) as exc:
        die(f"{path}: cannot read: {exc}")
    return parse_site(text, path)
