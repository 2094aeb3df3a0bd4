"""500 simulated agents -- the real Agent code, simulated nodes -- against one real etcd:
all register and heartbeat under leases, then roll an update through the group without
ever exceeding max-unavailable, as etcd's own history of the semaphore shows. A 3-member
cluster loses a member mid-run and every agent stays registered."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imgbase.agent import fleet
from imgbase.agent.core import Agent
from imgbase.node.agentconfig import AgentConfig, Join
from tests.etcdcluster import EtcdCluster, etcd_cluster
from tests.unit.test_fleet import SimNode, max_holders_in_history

pytestmark = pytest.mark.slow

N, K, WORKERS = 500, 100, 10  # K: the most set-image allows (fleet.MAX_UNAVAILABLE)


def agents_for(cluster: EtcdCluster, group: str, n: int) -> list[Agent]:
    config = AgentConfig(Join(tuple(cluster.endpoints), group=group), ttl=30)
    return [Agent(config, f"node-{i:03}", SimNode("n-1.0-1"),
                  cluster.client(timeout=10)) for i in range(n)]


def tick_all(agents: list[Agent]) -> list[str]:
    """One round: every agent that is up ticks once (in WORKERS threads of agents)."""
    def run(chunk: list[Agent]) -> list[str]:
        out = []
        for agent in chunk:
            sim = agent.node
            assert isinstance(sim, SimNode)
            if sim.down:
                sim.down -= 1
                out.append("down")
            else:
                out.append(agent.tick())
        return out
    chunks = [agents[i::WORKERS] for i in range(WORKERS)]
    with ThreadPoolExecutor(WORKERS) as pool:
        return [a for part in pool.map(run, chunks) for a in part]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as c:
        yield c


def test_500_agents_register_heartbeat_and_roll_within_max_unavailable(
        cluster: EtcdCluster) -> None:
    agents = agents_for(cluster, "big", N)
    t0 = time.monotonic()
    assert set(tick_all(agents)) == {"idle"}
    print(f"\n{N} agents registered in {time.monotonic() - t0:.1f} s")
    with cluster.client() as admin:
        assert len(fleet.nodes(admin)) == N
        assert set(tick_all(agents)) == {"idle"}  # heartbeats
        start = admin.revision() + 1
        fleet.set_image(admin, "big", "n-2.0-1", "https://127.0.0.1/n-2.0-1.squashfs", K)
        rounds = 0
        def busy() -> list[Agent]:
            return [a for a in agents if a.holding or a.node.state().booted_nvr != "n-2.0-1"]

        while busy() and rounds < 80:
            tick_all(busy())  # nodes done and without a slot only heartbeat: left out
            rounds += 1
        assert not busy(), rounds
        print(f"rolled {N} nodes, {K} at a time, in {rounds} rounds")
        assert max_holders_in_history(admin, "big", start) == K
        assert fleet.EtcdSlots(admin, "big").holders() == ()
        for agent in agents:
            agent.leave()
        assert fleet.nodes(admin) == {}  # revoked leases took the records along


def test_a_member_killed_mid_run_keeps_every_agent_registered(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path, size=3) as trio:
        agents = agents_for(trio, "trio", 100)
        assert set(tick_all(agents)) == {"idle"}
        trio.kill_member(trio.leader_index())
        trio.leader_index()  # the two left elect a new leader
        for _ in range(3):
            states = tick_all(agents)
            if set(states) == {"idle"}:
                break
            time.sleep(1)  # agents retry with their backoff
            for a in agents:
                a.next_try = 0
        assert set(states) == {"idle"}, sorted(set(states))
        with trio.client(endpoints=[m.client_url for i, m in enumerate(trio.members)
                                    if trio.members[i].proc is not None]) as admin:
            assert len(fleet.nodes(admin)) == 100
