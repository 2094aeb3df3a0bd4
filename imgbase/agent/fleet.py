"""Fleet state in etcd: the nodes, the desired image per group, the reboot slots, rollouts.

Keys (all JSON values)::

    /imgbase/nodes/<node-id>                  the node's record, under its lease
    /imgbase/fleet/<group>/desired            {"nvr", "url", "max_unavailable", "set_at"}
    /imgbase/fleet/<group>/semaphore          {"max": K, "holders": [node-id, ...]}
    /imgbase/fleet/<group>/rollout            {"state": "running"|"paused", "reason", "by"}
    /imgbase/fleet/<group>/results/<node-id>  {"nvr", "outcome", "time"}

**Reboot slots** follow FleetLock's semantics (the protocol of Fedora CoreOS's Zincati and
its airlock server): a per-group counting semaphore of ``max_unavailable`` slots, held by
node id -- recursive, so a node that asks again (after its reboot) still holds its slot
-- and released only after the node is back and healthy. The semaphore is one key changed
by compare-and-swap on its revision, so etcd's history of that key is the history of who
held a slot when: a test reads it back to prove the limit was never exceeded. Slots have
no lease: a slot is held *across* the holder's reboot. A node that never comes back keeps
its slot, which stops the group's rollout, as it should; ``imgbase fleet release`` frees it.

:class:`FleetLock` is the same slot API spoken over HTTP to a FleetLock server
(``POST /v1/pre-reboot`` and ``/v1/steady-state``, header ``fleet-lock-protocol: true``).

>>> parse_desired('{"nvr": "n-2.0-1", "url": "http://h/n.squashfs", "max_unavailable": 2}')
Desired(nvr='n-2.0-1', url='http://h/n.squashfs', max_unavailable=2, set_at=0.0, tries=3)
>>> parse_desired('{"nvr": "n-2.0-1"}')
Traceback (most recent call last):
...
imgbase.errors.ImgbaseError: the desired-image record has no url
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ..errors import ImgbaseError
from ..naming import Nvr
from .etcd import Etcd, Put, Range, absent, mod_revision_is

ROOT = "/imgbase"
CAS_TRIES = 50


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
    except ImgbaseError as exc:
        raise ImgbaseError(f"the desired-image record's nvr: {exc.message}") from exc
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


def parse_semaphore(text: str) -> Semaphore:
    try:
        doc = json.loads(text)
        return Semaphore(int(doc["max"]), tuple(str(h) for h in doc.get("holders", [])))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ImgbaseError(f"the reboot semaphore record is malformed: {text[:80]!r}",
                           hint="imgbase fleet release --all resets it") from exc


def _semaphore_json(sem: Semaphore) -> str:
    return json.dumps({"max": sem.max, "holders": list(sem.holders)}, sort_keys=True)


class SlotLock(Protocol):
    def acquire(self, node: str) -> bool: ...
    def release(self, node: str) -> None: ...


@dataclass
class EtcdSlots:
    """The group's reboot slots in etcd (see the module docstring)."""

    etcd: Etcd
    group: str
    default_max: int = 1

    @property
    def key(self) -> str:
        return group_key(self.group, "semaphore")

    def read(self) -> tuple[Semaphore, int]:
        got = self.etcd.get(self.key)
        if got is None:
            return Semaphore(self.default_max), 0
        return parse_semaphore(got.value), got.mod_revision

    def _cas(self, change: Any) -> bool:
        """Apply change(Semaphore) -> Semaphore | None (None: give up) by compare-and-swap."""
        for _ in range(CAS_TRIES):
            sem, rev = self.read()
            new = change(sem)
            if new is None:
                return False
            if new == sem and rev:
                return True  # nothing to change (an absent key is still written)
            compare = mod_revision_is(self.key, rev) if rev else absent(self.key)
            if self.etcd.txn([compare], [Put(self.key, _semaphore_json(new))]).succeeded:
                return True
        raise ImgbaseError(f"the reboot semaphore of group {self.group} kept changing under "
                           f"{CAS_TRIES} tries", hint="try again")

    def acquire(self, node: str) -> bool:
        def take(sem: Semaphore) -> Semaphore | None:
            if node in sem.holders:
                return sem  # recursive: still ours
            if len(sem.holders) >= sem.max:
                return None
            return Semaphore(sem.max, (*sem.holders, node))
        return self._cas(take)

    def release(self, node: str) -> None:
        self._cas(lambda sem: Semaphore(sem.max, tuple(h for h in sem.holders if h != node)))

    def set_max(self, k: int) -> None:
        self._cas(lambda sem: Semaphore(k, sem.holders))

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

def set_image(etcd: Etcd, group: str, nvr: str, url: str, max_unavailable: int,
              tries: int = 3) -> Desired:
    desired = Desired(str(Nvr.parse(nvr)), url, max_unavailable, round(time.time(), 3), tries)
    if max_unavailable < 1:
        raise ImgbaseError(f"--max-unavailable {max_unavailable}: at least 1",
                           hint="give 1 or more")
    if not 1 <= tries <= 9:
        raise ImgbaseError(f"--tries {tries} is out of range", hint="give 1 to 9")
    EtcdSlots(etcd, group, max_unavailable).set_max(max_unavailable)
    etcd.put(group_key(group, "desired"), json.dumps(asdict(desired), sort_keys=True))
    set_rollout(etcd, group, "running", None, "admin")
    return desired


def set_rollout(etcd: Etcd, group: str, state: str, reason: str | None, by: str) -> None:
    etcd.put(group_key(group, "rollout"), json.dumps(
        {"state": state, "reason": reason, "by": by, "time": round(time.time(), 3)},
        sort_keys=True))


def rollout(etcd: Etcd, group: str) -> dict[str, Any]:
    got = etcd.get(group_key(group, "rollout"))
    if got is None:
        return {"state": "running", "reason": None}
    try:
        doc: dict[str, Any] = json.loads(got.value)
        return doc
    except json.JSONDecodeError:
        return {"state": "paused", "reason": "the rollout record is malformed"}


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


def group_view(etcd: Etcd, group: str) -> GroupView:
    keys = [group_key(group, w) for w in ("desired", "rollout", "semaphore")]
    result = etcd.txn([], [Range(k) for k in keys])
    want_e, roll_e, sem_e = (r.entries[0].value if r.entries else None
                             for r in result.responses)
    want, error = None, None
    if want_e is not None:
        try:
            want = parse_desired(want_e)
        except ImgbaseError as exc:
            error = exc.message
    try:
        paused = roll_e is not None and json.loads(roll_e).get("state") == "paused"
    except (json.JSONDecodeError, AttributeError):
        paused = True  # an unreadable rollout record stops the rollout, never starts one
    holders = parse_semaphore(sem_e).holders if sem_e is not None else ()
    return GroupView(want, error, paused, holders)


def record_result(etcd: Etcd, group: str, node: str, nvr: str, outcome: str) -> None:
    etcd.put(group_key(group, f"results/{node}"), json.dumps(
        {"nvr": nvr, "outcome": outcome, "time": round(time.time(), 3)}, sort_keys=True))


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
        try:
            sem, _ = EtcdSlots(etcd, group).read()
            slots: Any = {"max": sem.max, "holders": list(sem.holders)}
        except ImgbaseError as exc:
            slots = {"error": exc.message}
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
