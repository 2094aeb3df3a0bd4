"""``imgbase-agent``: the node's cluster agent (``imgbase-agent.service``, Type=notify).

    imgbase-agent run            the daemon (what the unit starts)
    imgbase-agent registered     exit 0 when the agent is registered (a health check)
    imgbase-agent status [--json]

The daemon never holds up a boot: it tells systemd it is ready after its first attempt
to register, whatever the outcome, and then keeps trying with a capped backoff while
etcd is unreachable, saying so in its status line and in ``/run/imgbase/agent.json``.
No config (no ``/etc/imgbase/agent.toml``, no ``imgbase.agent.endpoints=``): the unit's
conditions skip it; run by hand, it says so and exits 0 -- a node outside any cluster.
A bad config: one clear line in the journal and exit 78 (EX_CONFIG) -- the unit fails,
visibly, and is not restarted; the node boots.
SIGTERM (a clean shutdown) revokes the lease, so the node's record goes at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ImgbaseError

STATE = Path("/run/imgbase/agent.json")
HOLDING = Path("/var/lib/imgbase/agent-fleetlock-slot")  # a FleetLock slot, across reboots
EX_CONFIG = 78
log = logging.getLogger("imgbase.agent")


def write_state(agent: Any, path: Path = STATE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({
        "node_id": agent.node_id, "group": agent.config.group, "state": agent.state,
        "registered": agent.state == "registered" and agent.lease is not None,
        "endpoint": agent.etcd.endpoint, "action": agent.last_action,
        "holding_slot": agent.holding, "time": round(time.time(), 3)}, indent=2) + "\n")
    tmp.replace(path)


def run_daemon() -> int:
    from ..errors import InputError
    from ..node import agentconfig as agent_config
    from ..node.systemd import notify
    from .core import Agent, LeaseKeeper
    from .etcd import Etcd
    from .host import HostNode

    try:
        config = agent_config.load()
        node_id = agent_config.node_id_of(config)
        password = config.password()

        def client() -> Etcd:
            return Etcd(list(config.endpoints), ca=config.ca, cert=config.cert,
                        key=config.key, user=config.user, password=password)

        etcd, keeper_etcd = client(), client()
    except InputError as exc:
        # no READY on the way out: systemd may see the exit before the message, and a
        # notify service that exits before READY is a failure of its own ("protocol")
        if "is missing and the kernel command line names no cluster" in exc.message:
            log.info("not configured: %s", exc.oneline())
            return 0
        log.error("%s", exc.oneline())
        return EX_CONFIG
    agent = Agent(config, node_id, HostNode(config.migrate_hook), etcd,
                  hostname=socket.gethostname(),
                  holding_file=HOLDING if config.fleetlock else None)
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # the first pass only joins: READY follows at once, so no boot waits on a rollout step
    first = True
    # a long pass (staging an image) must not let the lease run out: renewed apart
    with LeaseKeeper(agent, keeper_etcd):
        while not stopping:
            try:
                action = agent.tick(roll=not first)
            except ImgbaseError as exc:  # a step on the node failed: report, go on
                agent.last_action = f"failed: {exc.message}"
                action = agent.last_action
                log.error("%s", exc.oneline())
            write_state(agent)
            notify(("READY=1\n" if first else "") + f"STATUS={agent.state}; {action}")
            first = False
            now = time.monotonic()
            wait = agent.next_try - now if agent.next_try > now else config.ttl / 3
            deadline = now + max(1.0, wait)
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.2)
    notify("STOPPING=1")
    agent.leave()
    agent.state = "stopped"
    write_state(agent)
    log.info("left the cluster (lease revoked)")
    return 0


def registered(path: Path = STATE) -> int:
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        print("the agent has written no state (not running?)")
        return 1
    if state.get("registered"):
        print(f"registered as {state['node_id']} via {state.get('endpoint')}")
        return 0
    print(f"not registered: {state.get('state')}")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgbase-agent", description="The node's cluster agent: joins the cluster "
        "(etcd) at boot, reports the node, and rolls the group's updates "
        "(imgbase-agent.service). See docs/agent.md.")
    parser.add_argument("--version", action="version", version=f"imgbase-agent {__version__}")
    parser.add_argument("command", nargs="?", choices=["run", "registered", "status"],
                        default="run",
                        help="run: the daemon, what the unit starts (the default); registered: "
                        "exit 0 when the agent is registered (a health check); status: the "
                        "agent's state")
    parser.add_argument("--json", action="store_true", help="status: the state as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="imgbase-agent: %(message)s")
    if args.command == "registered":
        return registered()
    if args.command == "status":
        try:
            text = STATE.read_text()
        except OSError:
            print("imgbase-agent: no state (the agent is not running)", file=sys.stderr)
            return 1
        print(text if args.json else "\n".join(
            f"{k}: {v}" for k, v in json.loads(text).items()))
        return 0
    return run_daemon()
