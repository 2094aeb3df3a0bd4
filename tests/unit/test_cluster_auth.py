"""A least-privilege cluster against a real etcd (TLS, client certificates required, auth
on, set up by fleet.init_auth and fleet.add_node): a node's own credentials register,
heartbeat, take and give back a reboot slot -- and every abuse of another node's or the
admin's keys is refused by etcd itself."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from imgbase.agent import fleet
from imgbase.agent.core import Agent
from imgbase.agent.etcd import Etcd, EtcdError
from imgbase.errors import ImgbaseError
from imgbase.node.agentconfig import AgentConfig, Join
from tests.etcdcluster import AuthCluster, auth_cluster
from tests.unit.test_fleet import SimNode

G = "rack1"
PERMISSION_DENIED = 7  # gRPC code


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthCluster]:
    with auth_cluster(tmp_path_factory.mktemp("etcd-auth")) as c:
        c.add_node("node-a", G)
        c.add_node("node-b", G)
        with c.admin() as admin:
            fleet.set_image(admin, G, "n-2.0-1", "https://img.example/n-2.0-1.squashfs", 1)
        yield c


def refused(action: object) -> None:
    """The call raises etcd's "permission denied"."""
    assert callable(action)
    with pytest.raises(EtcdError) as caught:
        action()
    assert caught.value.code == PERMISSION_DENIED, caught.value.message


def test_a_node_registers_heartbeats_and_takes_and_gives_back_its_slot(
        cluster: AuthCluster) -> None:
    with cluster.node("node-a") as a:
        lease = a.lease_grant(10)
        a.put(fleet.node_key("node-a"), '{"id": "node-a"}', lease)
        assert a.lease_keepalive(lease) > 0
        slots = fleet.EtcdSlots(a, G)
        assert slots.acquire("node-a") and slots.holders() == ("node-a",)
        slots.release("node-a")
        assert slots.holders() == ()
        fleet.record_result(a, G, "node-a", "n-2.0-1", "updated")
        assert fleet.group_view(a, G).desired is not None  # it reads its group
        assert a.lease_revoke(lease)


def test_an_agent_runs_on_its_own_etcd_user(cluster: AuthCluster) -> None:
    config = AgentConfig(Join(tuple(cluster.cluster.endpoints), group=G), ttl=10)
    sim = SimNode("n-1.0-1")
    with cluster.node("node-a") as a, cluster.admin() as admin:
        agent = Agent(config, "node-a", sim, a)
        actions = [agent.tick() for _ in range(6)]
        # staged, took the slot, rebooted, came back healthy and gave the slot back
        assert actions[:5] == ["stage", "acquire", "reboot", "release", "idle"]
        assert sim.reboots == 1 and sim.booted == "n-2.0-1"
        assert fleet.EtcdSlots(admin, G).holders() == ()
        assert fleet.nodes(admin)["node-a"]["nvr"] == "n-2.0-1"
        agent.leave()


def test_a_node_cannot_resize_steal_or_pause(cluster: AuthCluster) -> None:
    with cluster.node("node-a") as a, cluster.node("node-b") as b:
        b_slots = fleet.EtcdSlots(b, G)
        assert b_slots.acquire("node-b")
        b_lease = b.lease_grant(10)
        b.put(fleet.node_key("node-b"), '{"id": "node-b"}', b_lease)
        mine = [e for e in a.get_prefix(fleet.group_key(G, "slots/"))]
        assert [e.key.rsplit("/", 1)[1] for e in mine] == ["node-b"]
        b_slot = mine[0]
        # raise the semaphore's max
        refused(lambda: a.put(fleet.group_key(G, "max"), "50"))
        refused(lambda: fleet.EtcdSlots(a, G).set_max(50))
        # evict a slot holder: delete its key, revoke its lease, overwrite it
        refused(lambda: a.delete(b_slot.key))
        refused(lambda: a.lease_revoke(b_slot.lease))
        refused(lambda: a.put(b_slot.key, "node-a"))
        refused(lambda: fleet.EtcdSlots(a, G).release("node-b"))
        # take a slot in another's name (the id is the etcd user, not what the node says)
        refused(lambda: fleet.EtcdSlots(a, G).acquire("node-c"))
        # pause or resume the rollout
        refused(lambda: fleet.set_rollout(a, G, "paused", "mine", "node-a"))
        refused(lambda: fleet.set_rollout(a, G, "running", None, "node-a"))
        # overwrite another node's record or result, or remove it
        refused(lambda: a.put(fleet.node_key("node-b"), '{"id": "node-b", "nvr": "x"}'))
        refused(lambda: a.delete(fleet.node_key("node-b")))
        refused(lambda: fleet.record_result(a, G, "node-b", "n-2.0-1", "rolled-back"))
        # write the desired image
        refused(lambda: a.put(fleet.group_key(G, "desired"), json.dumps(
            {"nvr": "n-9.0-1", "url": "https://evil/n-9.0-1.squashfs"})))
        with pytest.raises(ImgbaseError):
            fleet.set_image(a, G, "n-9.0-1", "https://evil/n-9.0-1.squashfs", 1)
        # another group's keys, and the users and roles
        refused(lambda: a.put(fleet.group_key("other", "slots/node-a"), "node-a"))
        refused(lambda: a.user_add("node-z", "x"))
        refused(lambda: a.role_grant(fleet.node_role("node-a"), "/", prefix=True))
        # all of that left b's slot, b's record and the admin's keys as they were
        with cluster.admin() as admin:
            assert fleet.EtcdSlots(admin, G).read()[0] == fleet.Semaphore(1, ("node-b",))
            assert admin.get(fleet.node_key("node-b")) is not None
            assert fleet.desired(admin, G).nvr == "n-2.0-1"  # type: ignore[union-attr]
            assert not fleet.group_view(admin, G).paused
        b_slots.release("node-b")
        b.lease_revoke(b_lease)


def test_a_wrong_password_is_not_let_in(cluster: AuthCluster) -> None:
    with cluster.node("node-a", password="not-its-password") as a, \
            pytest.raises(EtcdError, match="authentication failed"):
        a.get(fleet.node_key("node-a"))
    tls = cluster.cluster.tls
    assert tls is not None
    with Etcd(cluster.cluster.endpoints, ca=tls.ca, cert=tls.client_cert,
              key=tls.client_key) as anonymous, \
            pytest.raises(EtcdError, match="user name is empty|permission denied"):
        anonymous.put(fleet.group_key(G, "max"), "50")
