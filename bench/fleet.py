#!/usr/bin/env python3
"""bench/fleet: 500 agents against one real etcd on 127.0.0.1.

Registration throughput (lease + record per agent, 10 threads), heartbeat throughput,
and reboot-slot grant latency: every agent takes a slot of a group with max-unavailable
K and gives it back, 10 threads at once, so grants wait on each other as in a rollout;
p50/p99 of the time from asking to holding. Medians over --runs. Writes
bench/results/fleet.json.

    python bench/fleet.py [--agents 500] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imgbase.agent import fleet  # noqa: E402
from imgbase.agent.core import Agent, NodeState  # noqa: E402
from imgbase.node.agentconfig import AgentConfig, Join  # noqa: E402
from tests.etcdcluster import EtcdCluster, etcd_cluster  # noqa: E402

WORKERS, K = 10, 10


class IdleNode:
    def state(self) -> NodeState:
        return NodeState("n-1.0-1", None, True)

    def stage(self, url: str, nvr: str) -> None: ...
    def drain(self, policy: str) -> None: ...
    def reboot(self, nvr: str, tries: int) -> None: ...


def parallel(agents: list[Agent], fn: object) -> float:
    t0 = time.monotonic()
    chunks = [agents[i::WORKERS] for i in range(WORKERS)]
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda chunk: [fn(a) for a in chunk], chunks))  # type: ignore[operator]
    return time.monotonic() - t0


def one_run(cluster: EtcdCluster, n: int, run: int) -> dict[str, float]:
    config = AgentConfig(Join(tuple(cluster.endpoints), group=f"bench{run}"))
    agents = [Agent(config, f"node-{i:04}", IdleNode(), cluster.client(timeout=10))
              for i in range(n)]
    register = parallel(agents, lambda a: a.register(a.node.state()))
    heartbeat = parallel(agents, lambda a: a.heartbeat(a.node.state()))
    with cluster.client() as admin:
        fleet.EtcdSlots(admin, config.group, K).set_max(K)
    waits: list[float] = []

    def take_and_give(agent: Agent) -> None:
        slots = fleet.EtcdSlots(agent.etcd, config.group, K)
        t0 = time.monotonic()
        while not slots.acquire(agent.node_id):
            time.sleep(0.005)
        waits.append(time.monotonic() - t0)
        slots.release(agent.node_id)

    parallel(agents, take_and_give)
    for agent in agents:
        agent.leave()
        agent.etcd.close()
    waits.sort()
    return {"register_per_s": n / register, "heartbeat_per_s": n / heartbeat,
            "grant_p50_ms": 1000 * waits[len(waits) // 2],
            "grant_p99_ms": 1000 * waits[min(len(waits) - 1, int(len(waits) * 0.99))]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fleet.") as tmp, \
            etcd_cluster(Path(tmp)) as cluster:
        runs = [one_run(cluster, args.agents, r) for r in range(args.runs)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\n{args.agents} agents, one etcd member (127.0.0.1), {WORKERS} threads, "
          f"K = {K}, median of {args.runs}")
    print(f"{'registration (lease + record)':34} {med['register_per_s']:8.0f} agents/s")
    print(f"{'heartbeat (keep-alive)':34} {med['heartbeat_per_s']:8.0f} agents/s")
    print(f"{'reboot slot grant, p50':34} {med['grant_p50_ms']:8.1f} ms")
    print(f"{'reboot slot grant, p99':34} {med['grant_p99_ms']:8.1f} ms")
    out = ROOT / "bench/results/fleet.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"agents": args.agents, "runs": runs, "median": med},
                              indent=2) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
