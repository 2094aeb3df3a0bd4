"""Fleet state in etcd: the nodes, the desired image per group, the reboot slots, rollouts.

Keys (JSON values), and who may write them once etcd auth is on (:func:`init_auth`,
:func:`add_node`; a node's etcd user is its node id)::

    /imgbase/nodes/<node-id>                  the node's record, under its lease   the node
    /imgbase/fleet/<group>/desired            {"nvr", "url", "max_unavailable", ...} admin
    /imgbase/fleet/<group>/max                K: nodes rebooting at once            admin
    /imgbase/fleet/<group>/rollout            {"state": "running"|"paused", ...}    admin
    /imgbase/fleet/<group>/slots/<node-id>    the node's place in the slot queue   the node
    /imgbase/fleet/<group>/results/<node-id>  {"nvr", "outcome", "time"}           the node

A node reads its group's keys and writes only its own three; etcd refuses the rest.

**Reboot slots** follow FleetLock's semantics (the protocol of Fedora CoreOS's Zincati and
its airlock server): a per-group counting semaphore of ``max`` slots, held by node id --
recursive, so a node that asks again (after its reboot) still holds its slot -- and
released only after the node is back and healthy. It is etcd's queue recipe: a node
takes a place by creating its own key ``slots/<node-id>``, and holds a slot while its key
is among the ``max`` oldest (by create revision); giving it back deletes the key. No node
can resize the semaphore (``max`` is the admin's) or evict another (its key is not
theirs). The key lives under a lease of :data:`SLOT_TTL` seconds that the holder keeps
alive, across its reboot too (it reads the lease back from its key): a node that never
comes back loses its slot when the lease runs out; ``imgbase fleet release`` frees it
sooner.

**Pauses**: the admin pauses and resumes (the rollout key); a node that fell back from
the desired image reports it in its result, which pauses the group's rollout until the
admin writes the rollout key again (a result older than the rollout key no longer counts).

:class:`FleetLock` is the same slot API spoken over HTTP to a FleetLock server
(``POST /v1/pre-reboot`` and ``/v1/steady-state``, header ``fleet-lock-protocol: true``).

>>> parse_desired('{"nvr": "n-2.0-1", "url": "http://h/n-2.0-1.squashfs", "max_unavailable": 2}')
Desired(nvr='n-2.0-1', url='http://h/n-2.0-1.squashfs', max_unavailable=2, set_at=0.0, tries=3)
>>> parse_desired('{"nvr": "n-2.0-1"}')
Traceback (most recent call last):
...
imgbase.errors.ImgbaseError: the desired-image record has no url
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from ..errors import ImgbaseError, die
from ..image.naming import Nvr
from .etcd import Entry, Etcd, Put, Range, absent

ROOT = "/imgbase"
SLOT_TTL = 900  # seconds a slot outlives a silent holder: a reboot fits, a dead node does not
MAX_UNAVAILABLE = 100  # the most nodes of a group that may reboot at once


def node_key(node: str) -> str:
    return f"{ROOT}/nodes/{node}"


def group_key(group: str, what: str) -> str:
    return f"{ROOT}/fleet/{group}/{what}"


@dataclass(frozen=True)
class Desired:
    nvr: str
    url: str
    max_unavailable: int = 1
    set_at: float = 0.0
    tries: int = 3  # boots on trial for the new layer before GRUB falls back


def parse_desired(text: str) -> Desired:
    """A desired-image record, checked: a malformed one is an ImgbaseError, never a crash."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImgbaseError(f"the desired-image record is not JSON: {exc}",
                           hint="imgbase fleet set-image writes it") from exc
    if not isinstance(doc, dict):
        raise ImgbaseError("the desired-image record is not an object")
    for name in ("nvr", "url"):
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise ImgbaseError(f"the desired-image record has no {name}")
    try:
        Nvr.parse(doc["nvr"])
        # set-image's rules (http only with --insecure-http: left to the admin's side, the
        # image's signature is what the node trusts); the file names the NVR
        check_image_url(doc["url"], doc["nvr"], insecure_http=True)
    except ImgbaseError as exc:
        raise ImgbaseError(f"the desired-image record: {exc.message}") from exc
    k = doc.get("max_unavailable", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ImgbaseError(f"the desired-image record's max_unavailable {k!r} is not >= 1")
    tries = doc.get("tries", 3)  # records written before tries existed: the default
    if not isinstance(tries, int) or isinstance(tries, bool) or not 1 <= tries <= 9:
        raise ImgbaseError(f"the desired-image record's tries {tries!r} is not 1-9")
    return Desired(doc["nvr"], doc["url"], k, float(doc.get("set_at", 0.0)), tries)


@dataclass(frozen=True)
class Semaphore:
    max: int
    holders: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()


def parse_max(text: str | None, default: int = 1) -> int:
    """The admin's slot count; anything but a positive number means one slot.

    >>> parse_max("3"), parse_max(None), parse_max("-1"), parse_max("x")
    (3, 1, 1, 1)
    """
    try:
        k = int(text) if text is not None else default
    except ValueError:
        return 1
    return k if k >= 1 else 1


def slot_queue(entries: list[Entry], k: int) -> Semaphore:
    """The holders (the k oldest slot keys, by create revision) and the rest, waiting.

    >>> e = [Entry(f"s/{n}", "", 1, 0, rev) for n, rev in (("c", 9), ("a", 4), ("b", 6))]
    >>> slot_queue(e, 2)
    Semaphore(max=2, holders=('a', 'b'), waiting=('c',))
    """
    ids = [e.key.rsplit("/", 1)[1] for e in sorted(entries, key=lambda e: e.create_revision)]
    return Semaphore(k, tuple(ids[:k]), tuple(ids[k:]))


class SlotLock(Protocol):
    def acquire(self, node: str) -> bool: ...
    def release(self, node: str) -> None: ...


@dataclass
class EtcdSlots:
    """The group's reboot slots in etcd (see the module docstring): etcd's queue recipe.

    Each node writes only its own key, ``slots/<node-id>``, under a lease of ``slot_ttl``
    seconds that it keeps alive while it holds the slot (across its reboot: the lease id is
    read back from the key); it holds a slot when its key is among the ``max`` oldest. The
    number ``max`` is a key of its own that only the admin writes.
    """

    etcd: Etcd
    group: str
    default_max: int = 1
    slot_ttl: int = SLOT_TTL

    @property
    def prefix(self) -> str:
        return group_key(self.group, "slots/")

    @property
    def max_key(self) -> str:
        return group_key(self.group, "max")

    def read(self) -> tuple[Semaphore, int]:
        result = self.etcd.txn([], [Range(self.max_key), Range(self.prefix, prefix=True)])
        got_max, queue = result.responses
        k = parse_max(got_max.entries[0].value if got_max.entries else None, self.default_max)
        return slot_queue(queue.entries, k), got_max.revision

    def _mine(self, node: str) -> Entry | None:
        got = self.etcd.txn([], [Range(self.prefix + node)]).responses[0].entries
        return got[0] if got else None

    def acquire(self, node: str) -> bool:
        """Queue for a slot (once) and keep the key's lease alive; True when it is held."""
        key, mine = self.prefix + node, self._mine(node)
        if mine is None:
            lease = self.etcd.lease_grant(self.slot_ttl)
            self.etcd.txn([absent(key)], [Put(key, node, lease)])
        elif mine.lease and self.etcd.lease_keepalive(mine.lease) <= 0:
            return False  # the lease ran out just now: queue again on the next pass
        return node in self.holders()

    def release(self, node: str) -> None:
        mine = self._mine(node)
        if mine is None:
            return
        if mine.lease:
            self.etcd.lease_revoke(mine.lease)
        self.etcd.delete(self.prefix + node)

    def set_max(self, k: int) -> None:
        """The admin's: how many nodes of the group may reboot at once."""
        if not 1 <= k <= MAX_UNAVAILABLE:
            raise ImgbaseError(f"max-unavailable {k} is not 1 to {MAX_UNAVAILABLE}",
                               hint=f"give 1 to {MAX_UNAVAILABLE}")
        self.etcd.put(self.max_key, str(k))

    def holders(self) -> tuple[str, ...]:
        return self.read()[0].holders


@dataclass
class FleetLock:
    """Reboot slots from a FleetLock server (airlock and friends)."""

    url: str
    group: str
    timeout: float = 10.0
    session: Any = field(default=None, repr=False)

    def _post(self, path: str, node: str) -> bool:
        import requests

        session = self.session or requests
        body = {"client_params": {"id": node, "group": self.group}}
        try:
            resp = session.post(self.url.rstrip("/") + path, json=body, timeout=self.timeout,
                                headers={"fleet-lock-protocol": "true"})
        except requests.RequestException as exc:
            raise ImgbaseError(f"FleetLock server {self.url} did not answer: {exc}",
                               hint="check [agent] fleetlock in agent.toml") from exc
        if resp.status_code == 200:
            return True
        try:
            err = resp.json()
            kind, value = err.get("kind", "?"), err.get("value", "")
        except ValueError:
            kind, value = f"HTTP {resp.status_code}", resp.text[:200]
        if path.endswith("pre-reboot") and resp.status_code in (409, 423, 429, 503) \
                or kind in ("failed_lock", "semaphore_full", "lock_held"):
            return False  # no slot now: try again later
        raise ImgbaseError(f"FleetLock server {self.url} refused {path}: {kind}: {value}",
                           hint="the server's log says more")

    def acquire(self, node: str) -> bool:
        return self._post("/v1/pre-reboot", node)

    def release(self, node: str) -> None:
        self._post("/v1/steady-state", node)


# -- the fleet as a whole: set-image, status ----------------------------------------------

def check_image_url(url: str, nvr: str, insecure_http: bool = False) -> str:
    """The URL a group downloads its image from: https (http only when insecure), and
    its file name names the NVR, so a record cannot point a group at another image.

    >>> check_image_url("https://h/i/n-2.0-1.squashfs", "n-2.0-1")
    'https://h/i/n-2.0-1.squashfs'
    >>> check_image_url("https://h/i/other.squashfs", "n-2.0-1")
    Traceback (most recent call last):
    ...
    imgbase.errors.InputError: the URL's file other.squashfs does not name n-2.0-1
    """
    parts = urlsplit(url)
    if parts.scheme != "https" and not (insecure_http and parts.scheme == "http"):
        die(f"{url!r} is not an https URL",
            hint="nodes download the image from it; http only with --insecure-http")
    if not parts.hostname or any(c.isspace() for c in url):
        die(f"{url!r} is not a URL", hint="e.g. https://images.example.org/NVR.squashfs")
    name = parts.path.rsplit("/", 1)[-1]
    if not name.startswith(f"{nvr}.") and name != nvr:
        die(f"the URL's file {name or '(none)'} does not name {nvr}",
            hint=f"publish the image as {nvr}.squashfs")
    return url


def set_image(etcd: Etcd, group: str, nvr: str, url: str, max_unavailable: int,
              tries: int = 3, *, resume: bool = False, insecure_http: bool = False) -> Desired:
    """The admin's: publish the image a group should run. A paused rollout (by the admin,
    or by a node that fell back from the desired image) stays paused unless ``resume``."""
    nvr = str(Nvr.parse(nvr))
    check_group(group)
    check_image_url(url, nvr, insecure_http)
    if not 1 <= max_unavailable <= MAX_UNAVAILABLE:
        die(f"--max-unavailable {max_unavailable} is not 1 to {MAX_UNAVAILABLE}",
            hint="how many nodes of the group may reboot at once")
    if not 1 <= tries <= 9:
        die(f"--tries {tries} is out of range", hint="give 1 to 9")
    view = group_view(etcd, group)
    if view.paused and not resume:
        die(f"the rollout of group {group} is paused ({view.pause_reason})",
            hint="give --resume to resume it with the new image, or imgbase fleet resume")
    desired = Desired(nvr, url, max_unavailable, round(time.time(), 3), tries)
    EtcdSlots(etcd, group, max_unavailable).set_max(max_unavailable)
    etcd.put(group_key(group, "desired"), json.dumps(asdict(desired), sort_keys=True))
    if resume or view.rollout_revision == 0:
        set_rollout(etcd, group, "running", None, "admin")
    return desired


def set_rollout(etcd: Etcd, group: str, state: str, reason: str | None, by: str) -> None:
    """The admin's. Resuming also clears the pauses nodes reported before it (their
    results are older than the rollout record)."""
    etcd.put(group_key(group, "rollout"), json.dumps(
        {"state": state, "reason": reason, "by": by, "time": round(time.time(), 3)},
        sort_keys=True))


def rollout(etcd: Etcd, group: str) -> dict[str, Any]:
    view = group_view(etcd, group)
    return {"state": "paused" if view.paused else "running", "reason": view.pause_reason}


def desired(etcd: Etcd, group: str) -> Desired | None:
    got = etcd.get(group_key(group, "desired"))
    return parse_desired(got.value) if got is not None else None


@dataclass(frozen=True)
class GroupView:
    """A group's desired image (or why it cannot be read), rollout and slots: one read."""

    desired: Desired | None
    desired_error: str | None
    paused: bool
    holders: tuple[str, ...]
    pause_reason: str | None = None
    waiting: tuple[str, ...] = ()
    rollout_revision: int = 0
    results: tuple[tuple[str, str, str], ...] = ()  # (node, nvr, outcome) as the nodes wrote

    def reported(self, node: str, nvr: str, outcome: str) -> bool:
        """Whether node's result already says outcome for nvr (whatever the rollout since)."""
        return (node, nvr, outcome) in self.results


def _pause(roll: Entry | None, results: list[Entry], want: Desired | None) -> str | None:
    """Why the rollout is paused, or None: the admin paused it, or a node reported a
    fall-back from the desired image after the admin last set the rollout record."""
    if roll is not None:
        try:
            doc = json.loads(roll.value)
            if doc.get("state") == "paused":
                return str(doc.get("reason") or "paused by the admin")
        except (json.JSONDecodeError, AttributeError):
            return "the rollout record is malformed"  # stops a rollout, never starts one
    since = roll.mod_revision if roll is not None else 0
    for r in results:
        try:
            doc = json.loads(r.value)
        except json.JSONDecodeError:
            continue
        if (r.mod_revision > since and isinstance(doc, dict) and want is not None
                and doc.get("outcome") == "rolled-back" and doc.get("nvr") == want.nvr):
            return f"{r.key.rsplit('/', 1)[1]} fell back from {want.nvr}"
    return None


def group_view(etcd: Etcd, group: str) -> GroupView:
    ops = [Range(group_key(group, w)) for w in ("desired", "rollout", "max")]
    ops += [Range(group_key(group, "slots/"), prefix=True),
            Range(group_key(group, "results/"), prefix=True)]
    want_r, roll_r, max_r, slots_r, results_r = etcd.txn([], ops).responses
    want, error = None, None
    if want_r.entries:
        try:
            want = parse_desired(want_r.entries[0].value)
        except ImgbaseError as exc:
            error = exc.message
    roll = roll_r.entries[0] if roll_r.entries else None
    reason = _pause(roll, results_r.entries, want)
    sem = slot_queue(slots_r.entries,
                     parse_max(max_r.entries[0].value if max_r.entries else None))
    return GroupView(want, error, reason is not None, sem.holders, reason, sem.waiting,
                     roll.mod_revision if roll is not None else 0,
                     tuple(r for e in results_r.entries if (r := _result(group, e))))


def _result(group: str, entry: Entry) -> tuple[str, str, str] | None:
    """A node's result record as (node, nvr, outcome); None when it is not one."""
    try:
        doc = json.loads(entry.value)
        nvr, outcome = doc["nvr"], doc["outcome"]
    except (json.JSONDecodeError, TypeError, KeyError):
        return None
    node = entry.key.removeprefix(group_key(group, "results/"))
    if not (isinstance(nvr, str) and isinstance(outcome, str)):
        return None
    return node, nvr, outcome


def record_result(etcd: Etcd, group: str, node: str, nvr: str, outcome: str) -> None:
    """The node's own: what became of the desired image here ("rolled-back" pauses)."""
    etcd.put(group_key(group, f"results/{node}"), json.dumps(
        {"nvr": nvr, "outcome": outcome, "time": round(time.time(), 3)}, sort_keys=True))


# -- least privilege: the admin's users and roles -----------------------------------------

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def check_group(group: str) -> str:
    if not isinstance(group, str) or not NAME.fullmatch(group):
        die(f"group {group!r} is not a group name",
            hint="letters, digits, '.', '_', '-' (at most 63), e.g. rack1")
    return group


def check_node_id(node: str) -> str:
    if not isinstance(node, str) or not NAME.fullmatch(node) or node == "root":
        die(f"node id {node!r} is not a node name",
            hint="letters, digits, '.', '_', '-' (at most 63), not root")
    return node


def node_role(node: str) -> str:
    return f"imgbase-node-{node}"


def init_auth(etcd: Etcd, root_password: str) -> None:
    """The admin's user ``root`` (etcd's root role: it alone writes desired images, slot
    counts and rollout state) and etcd auth switched on."""
    etcd.user_add("root", root_password)
    etcd.user_grant("root", "root")
    etcd.auth_enable()


def add_node(etcd: Etcd, node: str, group: str, password: str) -> None:
    """A node's etcd user (its id) and role: it reads its group's keys and writes only its
    own record, its own slot key and its own result."""
    check_node_id(node)
    check_group(group)
    role = node_role(node)
    etcd.role_add(role)
    etcd.role_grant(role, group_key(group, ""), prefix=True, write=False)
    for key in (node_key(node), group_key(group, f"slots/{node}"),
                group_key(group, f"results/{node}")):
        etcd.role_grant(role, key)
    etcd.user_add(node, password)
    etcd.user_grant(node, role)


def nodes(etcd: Etcd) -> dict[str, dict[str, Any]]:
    out = {}
    for entry in etcd.get_prefix(f"{ROOT}/nodes/"):
        try:
            out[entry.key.rsplit("/", 1)[1]] = json.loads(entry.value)
        except json.JSONDecodeError:
            out[entry.key.rsplit("/", 1)[1]] = {"error": "malformed record"}
    return out


def status(etcd: Etcd) -> dict[str, Any]:
    """Nodes, versions, health, slot holders and rollout state, per group."""
    all_nodes = nodes(etcd)
    groups = sorted({str(n.get("group", "default")) for n in all_nodes.values()} | {
        e.key.split("/")[3] for e in etcd.get_prefix(f"{ROOT}/fleet/")})
    report: dict[str, Any] = {"nodes": all_nodes, "groups": {}}
    for group in groups:
        try:
            want: Any = desired(etcd, group)
            want = asdict(want) if want else None
        except ImgbaseError as exc:
            want = {"error": exc.message}
        sem, _ = EtcdSlots(etcd, group).read()
        slots: Any = {"max": sem.max, "holders": list(sem.holders),
                      "waiting": list(sem.waiting)}
        members = {k: v for k, v in all_nodes.items() if v.get("group", "default") == group}
        report["groups"][group] = {
            "desired": want, "slots": slots, "rollout": rollout(etcd, group),
            "nodes": sorted(members),
            "on_desired": sorted(k for k, v in members.items()
                                 if want and v.get("nvr") == want.get("nvr")),
        }
    return report


def render_status(report: dict[str, Any]) -> str:
    lines = []
    for name, g in report["groups"].items():
        want = g["desired"] or {}
        slots = g["slots"]
        lines.append(f"group {name}: desired {want.get('nvr', want.get('error', '-'))}, "
                     f"rollout {g['rollout'].get('state')}"
                     + (f" ({g['rollout']['reason']})" if g["rollout"].get("reason") else "")
                     + f", slots {len(slots.get('holders', []))}/{slots.get('max', '?')}, "
                     f"{len(g['on_desired'])}/{len(g['nodes'])} nodes on it")
    for node_id, n in sorted(report["nodes"].items()):
        lines.append(f"  {node_id[:12]} {n.get('hostname', '')[:16]:16} {n.get('nvr')} "
                     f"{'healthy' if n.get('healthy') else 'NOT healthy'} {n.get('action', '')}")
    return "\n".join(lines) or "no nodes and no groups"
