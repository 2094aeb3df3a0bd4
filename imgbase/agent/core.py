"""The agent's work, apart from the machine it runs on: join, heartbeat, roll updates.

:class:`Agent` talks to etcd and decides; what it does *to the node* goes through a
:class:`Node` -- the real one (:mod:`imgbase.agent.host`: imgbase status and update,
libvirt, logind) or a simulated one, so that hundreds of agents can run in one process
against a real etcd in the tests, through this very code.

One pass of :meth:`Agent.tick`:

1. not registered (or the lease is gone): grant a lease, write the record under it;
   etcd unreachable: back off (doubling, capped) and say so in ``state``;
2. keep the lease alive, refresh the record (health, domains, nvr);
3. roll: :func:`decide` looks at the group's desired image and rollout state, the node's
   booted and staged images, its health and its slot, and answers one action --
   ``stage`` (imgbase update from the URL), ``acquire`` (a reboot slot), ``wait-domains``
   (policy "wait": no slot while domains run), ``drain`` (running domains: wait, shut
   them down, or run the migrate hook), ``reboot``,
   ``release`` (back and healthy on the desired image), ``report-rollback`` (back on the
   old image: the node fell back by itself; the group's rollout pauses), or ``idle``.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import ImgbaseError
from ..node.agentconfig import AgentConfig
from . import fleet
from .etcd import Etcd

log = logging.getLogger("imgbase.agent")
STAGE_RETRY = 60.0  # seconds before the same image is staged again, doubling per try ...
STAGE_MAX = 6 * 3600.0  # ... up to this


class StageRefused(ImgbaseError):
    """The node refused the image (imgbase update's exit 65: not signed, a downgrade, a
    malformed image): staging it again cannot help."""


@dataclass
class NodeState:
    """What the agent needs to know about its node, read fresh on every pass."""

    booted_nvr: str | None
    staged_nvr: str | None  # an image with a complete layer, ready to boot (not the booted)
    healthy: bool | None  # the last health verdict of this boot (None: not yet known)
    fell_back_from: str | None = None  # the image of a layer abandoned during this boot
    running_domains: int = 0
    capabilities: dict[str, Any] = field(default_factory=dict)
    layer: str | None = None
    abandoned: tuple[str, ...] = ()  # images this node fell back from, ever


class Node(Protocol):
    def state(self) -> NodeState: ...
    def stage(self, url: str, nvr: str) -> None: ...  # new base + layer, default untouched
    def drain(self, policy: str) -> None: ...
    def reboot(self, nvr: str, tries: int) -> None: ...  # into nvr's layer, on trial


def decide(want: fleet.Desired | None, paused: bool, node: NodeState, holding: bool,
           given_up: set[str], policy: str = "wait") -> str:
    """One action for this pass (pure).

    Running domains: with the "wait" policy the node does not even take a slot while it
    has any (it would keep one from a node that could reboot now); "shutdown" and
    "migrate" take the slot first, since draining is itself the disruption.

    >>> D = fleet.Desired("n-2-1", "http://h/n-2-1.squashfs", 1)
    >>> s = NodeState("n-1-1", None, True)
    >>> decide(D, False, s, False, set()), decide(D, True, s, False, set())
    ('stage', 'idle')
    >>> decide(D, False, NodeState("n-1-1", "n-2-1", True), False, set())
    'acquire'
    >>> busy = NodeState("n-1-1", "n-2-1", True, running_domains=1)
    >>> decide(D, False, busy, False, set()), decide(D, False, busy, False, set(), "shutdown")
    ('wait-domains', 'acquire')
    >>> decide(D, False, NodeState("n-1-1", "n-2-1", True, running_domains=2), True, set())
    'drain'
    >>> decide(D, False, NodeState("n-1-1", "n-2-1", True), True, set())
    'reboot'
    >>> decide(D, True, NodeState("n-1-1", "n-2-1", True), True, set())  # paused: not now
    'release'
    >>> decide(D, False, NodeState("n-2-1", None, True), True, set())
    'release'
    >>> decide(D, False, NodeState("n-2-1", None, None), True, set())
    'wait'
    >>> decide(D, False, NodeState("n-1-1", None, True, fell_back_from="n-2-1"), True, set())
    'report-rollback'
    >>> decide(D, False, NodeState("n-1-1", None, True), False, {"n-2-1"})
    'idle'
    >>> decide(D, False, NodeState("n-1-1", None, True, fell_back_from="n-2-1"), False, set())
    'report-rollback'
    >>> decide(D, False, NodeState("n-1-1", None, True, fell_back_from="n-2-1"), False, {"n-2-1"})
    'idle'
    >>> decide(D, False, NodeState("n-1-1", "n-2-1", None), True, set())  # health unknown
    'wait'
    >>> decide(D, False, NodeState("n-1-1", None, True, abandoned=("n-2-1",)), False, set())
    'idle'
    """
    if node.healthy is None:  # this boot's health gate has not spoken: nothing yet
        return "wait"
    if node.fell_back_from is not None and (holding or (
            want is not None and node.fell_back_from == want.nvr and want.nvr not in given_up)):
        # without the slot too: its lease may have run out during a slow trial boot, and
        # the fall-back must still pause the group's rollout
        return "report-rollback"
    if holding and want is not None and node.booted_nvr == want.nvr:
        return "release" if node.healthy else "wait"
    if (want is None or node.booted_nvr == want.nvr or want.nvr in given_up
            or want.nvr in node.abandoned):
        return "release" if holding else "idle"
    if paused:  # no new reboots; a slot not yet used (a queue moves by itself) goes back
        return "release" if holding else "idle"
    if node.staged_nvr != want.nvr:
        return "stage"
    if not holding:
        return "wait-domains" if node.running_domains and policy == "wait" else "acquire"
    if node.running_domains:
        return "drain"
    return "reboot"


@dataclass
class Agent:
    config: AgentConfig
    node_id: str
    node: Node
    etcd: Etcd
    slots: fleet.SlotLock | None = None
    hostname: str = ""
    lease: int | None = None
    state: str = "starting"
    backoff: float = 1.0
    next_try: float = 0.0
    given_up: set[str] = field(default_factory=set)
    holding: bool = False
    last_action: str = "none"
    published: str = ""
    holding_file: Path | None = None  # where a FleetLock slot is remembered across reboots
    stage_tries: dict[tuple[str, str, float], tuple[int, float]] = field(default_factory=dict)
    refused: set[tuple[str, str, float]] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.slots is None:
            self.slots = (fleet.FleetLock(self.config.fleetlock, self.config.group)
                          if self.config.fleetlock else
                          fleet.EtcdSlots(self.etcd, self.config.group))
        if self.holding_file is not None and self.holding_file.exists():
            self.holding = True  # a FleetLock slot taken before the reboot

    def _remember_slot(self, holding: bool) -> None:
        self.holding = holding
        if self.holding_file is not None:
            if holding:
                self.holding_file.parent.mkdir(parents=True, exist_ok=True)
                self.holding_file.write_text(f"{self.config.fleetlock}\n")
            else:
                self.holding_file.unlink(missing_ok=True)

    # -- membership ---------------------------------------------------------------
    def record(self, node: NodeState) -> dict[str, Any]:
        return {"id": self.node_id, "hostname": self.hostname, "group": self.config.group,
                "nvr": node.booted_nvr, "layer": node.layer, "staged": node.staged_nvr,
                "healthy": node.healthy, "domains": node.running_domains,
                "capabilities": node.capabilities, "state": self.state,
                "action": self.last_action}

    def register(self, node: NodeState) -> None:
        self.lease = self.etcd.lease_grant(self.config.ttl)
        self.publish(node, force=True)

    def publish(self, node: NodeState, force: bool = False) -> None:
        """Write the record when it changed (the lease, not the record, says "alive")."""
        text = json.dumps(self.record(node), sort_keys=True)
        if force or text != self.published:
            self.etcd.put(fleet.node_key(self.node_id), text, self.lease)
            self.published = text

    def heartbeat(self, node: NodeState) -> None:
        assert self.lease is not None
        if self.etcd.lease_keepalive(self.lease) <= 0:  # expired while we were away
            self.lease = None
            self.register(node)
            return
        self.publish(node)

    def leave(self) -> None:
        """Clean shutdown: the record goes at once, not when the lease runs out."""
        if self.lease is not None:
            try:
                self.etcd.lease_revoke(self.lease)
            except ImgbaseError as exc:
                log.warning("could not revoke the lease: %s", exc.message)
            self.lease = None

    # -- one pass -------------------------------------------------------------------
    def tick(self, now: float | None = None, roll: bool = True) -> str:
        """Join or heartbeat, then (roll) one rollout action; returns the action or state."""
        now = time.monotonic() if now is None else now
        if now < self.next_try:
            return self.state
        node = self.node.state()
        try:
            if self.lease is None:
                self.register(node)
            else:
                self.heartbeat(node)
            self.state = "registered"
            self.backoff = 1.0
            action = self.roll(node, now) if roll else "registered"
        except ImgbaseError as exc:
            self.lease = None if "lease" in exc.message else self.lease
            self.state = f"retrying: {exc.message}"
            self.next_try = now + self.backoff * (0.5 + random.random() / 2)
            self.backoff = min(self.backoff * 2, self.config.backoff_max)
            log.warning("etcd: %s (next try in %.0f s)", exc.message, self.next_try - now)
            return self.state
        return action

    def stage(self, want: fleet.Desired, now: float | None = None) -> str:
        """Stage the desired image, at most once per :data:`STAGE_RETRY` (doubling) for
        the same record: an image this node refused (bad signature, a downgrade: exit 65)
        is not downloaded again until the admin publishes another record."""
        now = time.monotonic() if now is None else now
        record = (want.nvr, want.url, want.set_at)
        if record in self.refused:
            self.last_action = f"refused {want.nvr}"
            return "refused"
        tries, not_before = self.stage_tries.get(record, (0, 0.0))
        if now < not_before:
            self.last_action = f"staging {want.nvr} again in {not_before - now:.0f} s"
            return "wait-stage"
        self.stage_tries[record] = (tries + 1, now + min(STAGE_RETRY * 2 ** tries, STAGE_MAX))
        try:
            self.node.stage(want.url, want.nvr)
        except ImgbaseError as exc:  # the node's failure, not etcd's: no etcd backoff
            if isinstance(exc, StageRefused):
                self.refused.add(record)
            log.error("%s", exc.oneline())
            self.last_action = f"stage failed: {exc.message}"
            return "stage-failed"
        return "stage"

    def roll(self, node: NodeState, now: float | None = None) -> str:
        assert self.slots is not None
        group = self.config.group
        view = fleet.group_view(self.etcd, group)
        if view.desired_error:  # malformed: say so, do nothing
            self.last_action = f"ignoring the desired image: {view.desired_error}"
            return "idle"
        want = view.desired
        queued = False
        if isinstance(self.slots, fleet.EtcdSlots):
            self.holding = self.node_id in view.holders
            queued = self.node_id in view.waiting
            if self.holding:  # across the reboot too: the slot's lease must not run out
                self.slots.acquire(self.node_id)
        bad = node.fell_back_from
        if bad is not None and view.reported(self.node_id, bad, "rolled-back"):
            self.given_up.add(bad)  # reported before this agent started: not again
        action = decide(want, view.paused, node, self.holding, self.given_up,
                        self.config.domains)
        self.last_action = action
        if action == "stage" and want is not None:
            return self.stage(want, now)
        if queued and action in ("idle", "wait-domains", "wait"):
            self.slots.release(self.node_id)  # no longer waiting for a slot: leave the queue
        if action == "acquire":
            self._remember_slot(self.slots.acquire(self.node_id))
            if self.holding:
                self.last_action = "acquired"
        elif action == "drain":
            self.node.drain(self.config.domains)
        elif action == "reboot" and want is not None:
            self.node.reboot(want.nvr, want.tries)
        elif action == "release":
            self.slots.release(self.node_id)
            self._remember_slot(False)
            if want is not None and node.booted_nvr == want.nvr:
                fleet.record_result(self.etcd, group, self.node_id, want.nvr, "updated")
        elif action == "report-rollback":
            bad = node.fell_back_from or "?"
            self.given_up.add(bad)
            # the node's own result: it pauses the group's rollout (fleet.group_view)
            fleet.record_result(self.etcd, group, self.node_id, bad, "rolled-back")
            self.slots.release(self.node_id)
            self._remember_slot(False)
        return action


class LeaseKeeper:
    """Keeps the agent's lease alive from a thread of its own, on a client of its own,
    every ttl/3 s: a pass that takes long (staging gigabytes under `imgbase update`) must
    not let the node's record expire as if the node had died.

    Only renews; granting a new lease and writing the record stay with :meth:`Agent.tick`.
    """

    def __init__(self, agent: Agent, etcd: Etcd) -> None:
        self.agent, self.etcd = agent, etcd
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.agent.config.ttl / 3):
            lease = self.agent.lease
            if lease is None:
                continue
            try:
                if self.etcd.lease_keepalive(lease) > 0:
                    self.renewals += 1
            except ImgbaseError as exc:  # the next pass reports and backs off
                log.debug("lease keep-alive: %s", exc.message)
