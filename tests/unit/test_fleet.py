"""Fleet state against a real etcd on 127.0.0.1: reboot slots (FleetLock semantics) by
compare-and-swap, hammered by threads and by hypothesis; the desired image; the agent's
decisions driven through simulated nodes; a FleetLock server over HTTP."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgbase.agent import core, fleet
from imgbase.agent.core import Agent, LeaseKeeper, NodeState
from imgbase.agent.etcd import Etcd
from imgbase.errors import ImgbaseError
from imgbase.node.agentconfig import AgentConfig, Join
from tests.etcdcluster import EtcdCluster, etcd_cluster, max_holders_in_history


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as c:
        yield c


@pytest.fixture
def etcd(cluster: EtcdCluster) -> Iterator[Etcd]:
    with cluster.client() as client:
        yield client


def group() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


def test_slots_are_counted_recursive_and_released(etcd: Etcd) -> None:
    slots = fleet.EtcdSlots(etcd, group(), default_max=2)
    assert slots.acquire("a") and slots.acquire("a")  # recursive: still one slot
    assert slots.acquire("b") and not slots.acquire("c")
    assert slots.holders() == ("a", "b")
    slots.release("a")
    slots.release("a")  # idempotent
    assert slots.acquire("c") and slots.holders() == ("b", "c")


def test_threads_hammering_the_semaphore_never_exceed_the_limit(cluster: EtcdCluster) -> None:
    g, k = group(), 3
    with cluster.client() as admin:
        start = admin.revision() + 1
        fleet.EtcdSlots(admin, g, k).set_max(k)
    granted: list[int] = []
    inside: list[int] = []  # the workers that believe they hold a slot, now
    most = [0]
    lock = threading.Lock()

    def worker(n: int) -> None:
        with cluster.client() as client:
            slots = fleet.EtcdSlots(client, g, k)
            for _ in range(5):
                if slots.acquire(f"node-{n}"):
                    with lock:
                        granted.append(n)
                        inside.append(n)
                        most[0] = max(most[0], len(inside))
                    time.sleep(0.01)
                    with lock:
                        inside.remove(n)
                    slots.release(f"node-{n}")
            slots.release(f"node-{n}")  # still queued: leave the queue

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert granted and 1 <= most[0] <= k  # slots were handed out, never more than k at once
    with cluster.client() as admin:
        assert 1 <= max_holders_in_history(admin, g, start) <= k
        assert fleet.EtcdSlots(admin, g).holders() == ()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(1, 3),
       ops=st.lists(st.tuples(st.sampled_from(["acquire", "release"]),
                              st.sampled_from(["n1", "n2", "n3", "n4"])), max_size=25))
def test_semaphore_behaves_like_its_model(etcd: Etcd, k: int,
                                          ops: list[tuple[str, str]]) -> None:
    slots = fleet.EtcdSlots(etcd, group(), default_max=k)
    queue: list[str] = []  # the model: a queue, whose first k hold a slot
    for op, node in ops:
        if op == "acquire":
            if node not in queue:
                queue.append(node)
            assert slots.acquire(node) is (node in queue[:k])
        else:
            slots.release(node)
            queue = [h for h in queue if h != node]
        assert list(slots.holders()) == queue[:k]


def test_set_image_and_a_malformed_record(etcd: Etcd) -> None:
    g = group()
    want = fleet.set_image(etcd, g, "n-2.0-1", "https://127.0.0.1/n-2.0-1.squashfs", 2)
    assert fleet.desired(etcd, g) == want
    assert fleet.EtcdSlots(etcd, g).read()[0].max == 2
    etcd.put(fleet.group_key(g, "desired"), '{"nvr": "n-2.0-1", "url": 5}')
    with pytest.raises(ImgbaseError, match="has no url"):
        fleet.desired(etcd, g)
    report = fleet.status(etcd)["groups"][g]
    assert "has no url" in report["desired"]["error"]  # reported, not a crash
    # what set-image refuses is refused when read too (a record written some other way)
    for url, says in (("http://x/other-9-1.squashfs", "does not name n-2.0-1"),
                      ("-o/tmp/x", "is not an https URL"), ("file:///etc/n-2.0-1", "https")):
        etcd.put(fleet.group_key(g, "desired"), json.dumps({"nvr": "n-2.0-1", "url": url}))
        with pytest.raises(ImgbaseError, match=says):
            fleet.desired(etcd, g)
    with pytest.raises(ImgbaseError, match="is not a name-version-release"):
        fleet.set_image(etcd, g, "garbage", "http://x/", 1)


def test_the_tries_travel_with_the_desired_image(etcd: Etcd) -> None:
    g = group()
    url = "https://127.0.0.1/n-2.0-1.squashfs"
    assert fleet.set_image(etcd, g, "n-2.0-1", url, 1, 1).tries == 1
    assert fleet.desired(etcd, g).tries == 1  # type: ignore[union-attr]
    with pytest.raises(ImgbaseError, match="--tries 0 is out of range"):
        fleet.set_image(etcd, g, "n-2.0-1", "https://127.0.0.1/n-2.0-1.squashfs", 1, 0)
    assert fleet.desired(etcd, g).tries == 1  # type: ignore[union-attr]  # unchanged
    # a record from before tries existed: the default; a bad one: refused, not a crash
    old = '{"nvr": "n-2.0-1", "url": "http://x/n-2.0-1.squashfs"'
    etcd.put(fleet.group_key(g, "desired"), old + "}")
    assert fleet.desired(etcd, g).tries == 3  # type: ignore[union-attr]
    etcd.put(fleet.group_key(g, "desired"), old + ', "tries": 99}')
    with pytest.raises(ImgbaseError, match="tries 99 is not 1-9"):
        fleet.desired(etcd, g)


class SimNode:
    """A node as the agent sees it: staging is instant, a reboot comes back on the staged
    image after `down` ticks, healthy unless `bad` names that image (then it falls back)."""

    def __init__(self, nvr: str, bad: str | None = None, domains: int = 0) -> None:
        self.booted, self.staged, self.bad = nvr, None, bad
        self.down, self.fell_back, self.domains = 0, None, domains
        self.reboots = 0

    def state(self) -> NodeState:
        return NodeState(self.booted, self.staged, True, self.fell_back, self.domains)

    def stage(self, url: str, nvr: str) -> None:
        self.staged = nvr

    def drain(self, policy: str) -> None:
        if policy == "shutdown":
            self.domains = 0

    def reboot(self, nvr: str, tries: int) -> None:
        assert nvr == self.staged and tries == 3
        self.reboots += 1
        self.down = 2
        if self.staged == self.bad:
            self.fell_back, self.staged = self.staged, None
        else:
            self.booted, self.staged = self.staged, None


def run_fleet(cluster: EtcdCluster, nodes: dict[str, SimNode], g: str, config: AgentConfig,
              rounds: int) -> list[Agent]:
    clients = [cluster.client() for _ in nodes]
    agents = [Agent(config, name, node, client)
              for (name, node), client in zip(nodes.items(), clients, strict=True)]
    for _ in range(rounds):
        for agent in agents:
            sim = agent.node
            assert isinstance(sim, SimNode)
            if sim.down:  # rebooting: not there
                sim.down -= 1
                continue
            agent.tick()
    return agents


def test_a_rolling_update_keeps_to_max_unavailable(cluster: EtcdCluster) -> None:
    g = group()
    config = AgentConfig(Join(tuple(cluster.endpoints), group=g))
    nodes = {f"node-{i}": SimNode("n-1.0-1") for i in range(8)}
    nodes["node-3"].domains = 1  # waits until its domain is gone (policy: wait)
    with cluster.client() as admin:
        start = admin.revision() + 1
        fleet.set_image(admin, g, "n-2.0-1", "https://127.0.0.1/n-2.0-1.squashfs", 2)
        agents = run_fleet(cluster, nodes, g, config, 30)
        assert nodes["node-3"].booted == "n-1.0-1" and nodes["node-3"].reboots == 0
        nodes["node-3"].domains = 0  # the domain stopped
        run_fleet(cluster, {"node-3": nodes["node-3"]}, g, config, 8)
        assert {n.booted for n in nodes.values()} == {"n-2.0-1"}
        assert max_holders_in_history(admin, g, start) == 2
        assert fleet.EtcdSlots(admin, g).holders() == ()
        results = fleet.status(admin)["groups"][g]
        assert results["slots"]["holders"] == [] and results["rollout"]["state"] == "running"
        for agent in agents:
            agent.leave()


class SlowStage(SimNode):
    """Staging takes `seconds` (a big image over a slow link), during one pass."""

    def __init__(self, nvr: str, seconds: float) -> None:
        super().__init__(nvr)
        self.seconds = seconds

    def stage(self, url: str, nvr: str) -> None:
        time.sleep(self.seconds)
        super().stage(url, nvr)


def record_seen(admin: Etcd, node: str, seconds: float) -> tuple[threading.Thread, list[bool]]:
    """A thread looking for the node's record twice a second for `seconds`."""
    seen: list[bool] = []

    def watch() -> None:
        for _ in range(int(seconds * 2)):
            seen.append(node in fleet.nodes(admin))
            time.sleep(0.5)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread, seen


def test_the_record_outlives_a_pass_longer_than_the_lease(cluster: EtcdCluster) -> None:
    """Staging for twice the TTL in one pass: the keeper renews the lease meanwhile, so
    the node never looks dead; without it the record is gone (the control)."""
    g = group()
    config = AgentConfig(Join(tuple(cluster.endpoints), group=g), ttl=5)
    with cluster.client() as admin:
        fleet.set_image(admin, g, "n-2.0-1", "https://127.0.0.1/n-2.0-1.squashfs", 1)
        for keeper_runs in (True, False):
            with cluster.client() as client, cluster.client() as own:
                agent = Agent(config, f"slow-{keeper_runs}", SlowStage("n-1.0-1", 11), client)
                agent.tick(roll=False)
                keeper = LeaseKeeper(agent, own)
                with keeper if keeper_runs else contextlib.nullcontext():
                    watcher, seen = record_seen(admin, agent.node_id, 11)
                    assert agent.tick() == "stage"  # 11 s in this one pass
                    watcher.join()
                if keeper_runs:
                    assert all(seen) and keeper.renewals >= 2, seen
                else:
                    assert not all(seen)  # the lease ran out during the pass
                agent.leave()


class SkewedClock:
    """The time module as a node whose wall clock is `skew` seconds off sees it."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def time(self) -> float:
        return time.time() + self.skew

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.parametrize("skew", [-86400.0, 86400.0])
def test_a_node_whose_clock_is_a_day_off_keeps_its_record_and_updates(
        cluster: EtcdCluster, monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    """Liveness is etcd's lease, timed by etcd alone: a node's wall clock a day off does
    not expire its record early or keep it late, and its rollout goes on."""
    skewed = SkewedClock(skew)
    for module in (core, fleet):  # the node's code only: not other threads'
        monkeypatch.setattr(module, "time", skewed)
    g = group()
    config = AgentConfig(Join(tuple(cluster.endpoints), group=g), ttl=5)
    with cluster.client() as admin, cluster.client() as client:
        node = SimNode("n-1.0-1")
        agent = Agent(config, "skewed", node, client)
        agent.tick(roll=False)
        watcher, seen = record_seen(admin, "skewed", 8)
        fleet.set_image(admin, g, "n-2.0-1", "https://127.0.0.1/n-2.0-1.squashfs", 1)
        for _ in range(5):  # a pass every ttl/3, as the daemon does
            agent.tick()
            time.sleep(config.ttl / 3)
        watcher.join()
        assert all(seen)
        assert (node.booted, node.reboots, agent.holding) == ("n-2.0-1", 1, False)
        agent.leave()
        assert "skewed" not in fleet.nodes(admin)


def test_a_renewal_that_comes_too_late_registers_again(cluster: EtcdCluster) -> None:
    """The agent's own clock ran slow (the node stalled): the lease expired before it
    renewed. The next pass finds the lease gone and registers again, with a new lease."""
    config = AgentConfig(Join(tuple(cluster.endpoints), group=group()), ttl=5)
    with cluster.client() as admin, cluster.client() as client:
        agent = Agent(config, "stalled", SimNode("n-1.0-1"), client)
        agent.tick(roll=False)
        first = agent.lease
        deadline = time.monotonic() + 15
        while "stalled" in fleet.nodes(admin) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "stalled" not in fleet.nodes(admin)  # etcd expired it: the node looked dead
        assert agent.tick(roll=False) == "registered"
        assert agent.lease != first and "stalled" in fleet.nodes(admin)
        agent.leave()


def test_a_node_that_falls_back_pauses_the_rollout(cluster: EtcdCluster) -> None:
    g = group()
    config = AgentConfig(Join(tuple(cluster.endpoints), group=g))
    nodes = {f"node-{i}": SimNode("n-1.0-1", bad="n-3.0-1") for i in range(4)}
    with cluster.client() as admin:
        fleet.set_image(admin, g, "n-3.0-1", "https://127.0.0.1/n-3.0-1.squashfs", 1)
        run_fleet(cluster, nodes, g, config, 20)
        assert sum(n.reboots for n in nodes.values()) == 1  # one tried, fell back, stopped
        rollout = fleet.rollout(admin, g)
        assert rollout["state"] == "paused" and "fell back from n-3.0-1" in rollout["reason"]
        assert fleet.EtcdSlots(admin, g).holders() == ()
        assert {n.booted for n in nodes.values()} == {"n-1.0-1"}


def test_a_fall_back_pauses_the_rollout_though_the_slot_ran_out(cluster: EtcdCluster) -> None:
    """The slot's lease can run out while a trial boot is slow; the node that then comes
    back on its old image must still report the fall-back (once, and not again from an
    agent restarted on the same boot after the admin resumed)."""
    g = group()
    config = AgentConfig(Join(tuple(cluster.endpoints), group=g))
    nodes = {f"node-{i}": SimNode("n-1.0-1", bad="n-3.0-1") for i in range(3)}
    with cluster.client() as admin:
        fleet.set_image(admin, g, "n-3.0-1", "https://127.0.0.1/n-3.0-1.squashfs", 1)
        agents = run_fleet(cluster, nodes, g, config, 4)
        down = [name for name, n in nodes.items() if n.down]
        assert len(down) == 1  # rebooting into n-3.0-1 on trial
        for entry in admin.get_prefix(fleet.group_key(g, "slots/")):
            admin.lease_revoke(entry.lease)  # the slot's lease ran out meanwhile
        assert fleet.EtcdSlots(admin, g).holders() == ()
        run_fleet(cluster, nodes, g, config, 20)
        assert sum(n.reboots for n in nodes.values()) == 1  # no second node tried it
        rollout = fleet.rollout(admin, g)
        assert rollout["state"] == "paused" and f"{down[0]} fell back" in rollout["reason"]
        result = admin.get(fleet.group_key(g, f"results/{down[0]}"))
        fleet.set_rollout(admin, g, "running", None, "root")  # the admin resumes
        again = Agent(config, down[0], nodes[down[0]], cluster.client())
        again.tick()  # the same boot, a new agent: the report is not written again
        assert admin.get(fleet.group_key(g, f"results/{down[0]}")) == result
        assert not fleet.group_view(admin, g).paused
        for agent in [*agents, again]:
            agent.leave()


def test_agent_backs_off_while_etcd_is_unreachable() -> None:
    config = AgentConfig(Join(("http://127.0.0.1:9",)), backoff_max=8)
    agent = Agent(config, "n", SimNode("n-1.0-1"), Etcd(["http://127.0.0.1:9"], timeout=1))
    waits = []
    now = 0.0
    for _ in range(6):
        state = agent.tick(now)
        assert state.startswith("retrying: ")
        waits.append(agent.next_try - now)
        now = agent.next_try
    assert waits[-1] <= 8 and waits[-1] >= 4  # doubled, then capped (with jitter)


class FleetLockHandler(http.server.BaseHTTPRequestHandler):
    holders: set[str] = set()
    seen: list[tuple[str, str | None, dict[str, Any]]] = []
    limit = 1

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, self.headers.get("fleet-lock-protocol"), body))
        node = body["client_params"]["id"]
        if self.headers.get("fleet-lock-protocol") != "true":
            return self.reply(400, {"kind": "missing_header", "value": "fleet-lock-protocol"})
        if body["client_params"]["group"] == "broken":
            return self.reply(500, {"kind": "internal", "value": "database is down"})
        if self.path == "/v1/pre-reboot":
            if node in self.holders or len(self.holders) < self.limit:
                self.holders.add(node)
                return self.reply(200, {})
            return self.reply(409, {"kind": "failed_lock", "value": "semaphore is full"})
        self.holders.discard(node)
        return self.reply(200, {})

    def reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_fleetlock_client_speaks_the_protocol() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FleetLockHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        lock = fleet.FleetLock(url, "workers")
        assert lock.acquire("a") and lock.acquire("a") and not lock.acquire("b")
        lock.release("a")
        assert lock.acquire("b")
        path, header, body = FleetLockHandler.seen[0]
        assert (path, header) == ("/v1/pre-reboot", "true")
        assert body == {"client_params": {"id": "a", "group": "workers"}}
        with pytest.raises(ImgbaseError, match="refused /v1/pre-reboot: internal: database"):
            fleet.FleetLock(url, "broken").acquire("a")
    finally:
        server.shutdown()
    with pytest.raises(ImgbaseError, match="did not answer"):
        fleet.FleetLock(url, "workers", timeout=2).acquire("a")


def test_fleet_cli_sets_an_image_and_reports(cluster: EtcdCluster,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from imgbase.cli import main

    g, ep = group(), ",".join(cluster.endpoints)
    on = ["--group", g, "--endpoints", ep, "--insecure-http"]  # the test etcd: plain http
    assert main(["fleet", "set-image", "n-2.0-1", "https://127.0.0.1/n-2.0-1.squashfs",
                 "--max-unavailable", "3", *on]) == 0
    assert f"group {g}: desired n-2.0-1, 3 node(s) at a time" in capsys.readouterr().out
    assert main(["fleet", "pause", *on]) == 0
    assert main(["fleet", "status", "--json", *on]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["groups"][g]["desired"]["nvr"] == "n-2.0-1"
    assert report["groups"][g]["rollout"]["state"] == "paused"
    assert report["groups"][g]["slots"] == {"max": 3, "holders": [], "waiting": []}
    assert main(["fleet", "status", "--endpoints", "http://127.0.0.1:9", "--insecure-http"]) != 0
    assert "127.0.0.1:9" in capsys.readouterr().err
    assert main(["fleet", "status", "--endpoints", ep]) == 2  # no --insecure-http
    assert "is plain http" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "said"), [
    (["n-3.0-1", "ftp://x/n-3.0-1.squashfs"], "is not an https URL"),
    (["n-3.0-1", "https://x/n-2.0-1.squashfs"], "does not name n-3.0-1"),
    (["n-3.0-1", "https://x/"], "does not name n-3.0-1"),
    (["n-3.0-1", "https://x/n-3.0-1.squashfs", "--max-unavailable", "1000000"],
     "is not 1 to 100"),
    (["n-3.0-1", "https://x/n-3.0-1.squashfs", "--max-unavailable", "0"], "is not 1 to 100"),
    (["n-3.0-1", "https://x/n-3.0-1.squashfs"], "is paused"),  # no --resume
])
def test_set_image_refuses_and_writes_nothing(cluster: EtcdCluster,
                                              capsys: pytest.CaptureFixture[str],
                                              args: list[str], said: str) -> None:
    from imgbase.cli import main

    g, ep = group(), ",".join(cluster.endpoints)
    on = ["--group", g, "--endpoints", ep]
    assert main(["fleet", "set-image", "n-2.0-1", "https://x/n-2.0-1.squashfs", *on,
                 "--insecure-http"]) == 0
    assert main(["fleet", "pause", *on, "--insecure-http"]) == 0
    with cluster.client() as etcd:
        before = etcd.get_prefix(fleet.group_key(g, ""))
        assert main(["fleet", "set-image", *args, *on, "--insecure-http"]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert etcd.get_prefix(fleet.group_key(g, "")) == before  # nothing written
        # an explicit --resume publishes it and resumes the rollout
        assert main(["fleet", "set-image", "n-3.0-1", "https://x/n-3.0-1.squashfs", *on,
                     "--insecure-http", "--resume"]) == 0
        view = fleet.group_view(etcd, g)
        assert view.desired is not None and view.desired.nvr == "n-3.0-1" and not view.paused


def test_a_resume_clears_a_nodes_fall_back_report(etcd: Etcd) -> None:
    g = group()
    fleet.set_image(etcd, g, "n-3.0-1", "https://x/n-3.0-1.squashfs", 1)
    with pytest.raises(ImgbaseError, match="is not an https URL"):  # http: not without
        fleet.set_image(etcd, g, "n-3.0-1", "http://x/n-3.0-1.squashfs", 1)  # insecure_http
    fleet.record_result(etcd, g, "node-1", "n-3.0-1", "rolled-back")
    assert fleet.group_view(etcd, g).pause_reason == "node-1 fell back from n-3.0-1"
    with pytest.raises(ImgbaseError, match="is paused"):
        fleet.set_image(etcd, g, "n-3.0-1", "https://x/n-3.0-1.squashfs", 1)
    fleet.set_image(etcd, g, "n-4.0-1", "https://x/n-4.0-1.squashfs", 1, resume=True)
    assert not fleet.group_view(etcd, g).paused


def test_an_agent_on_fleetlock_keeps_its_slot_across_the_reboot(
        cluster: EtcdCluster, tmp_path: Any) -> None:
    FleetLockHandler.holders, FleetLockHandler.seen = set(), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FleetLockHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    g = group()
    config = AgentConfig(Join(tuple(cluster.endpoints), group=g),
                         fleetlock=f"http://127.0.0.1:{server.server_address[1]}")
    slot = tmp_path / "slot"
    sim = SimNode("n-1.0-1")
    try:
        with cluster.client() as admin:
            fleet.set_image(admin, g, "n-2.0-1", "https://127.0.0.1/n-2.0-1.squashfs", 1)
            agent = Agent(config, "node-a", sim, cluster.client(), holding_file=slot)
            while sim.reboots == 0:
                agent.tick()
            assert slot.exists() and FleetLockHandler.holders == {"node-a"}
            # the reboot: a new agent process, which knows its slot from the file alone
            after = Agent(config, "node-a", sim, cluster.client(), holding_file=slot)
            assert after.holding
            assert after.tick() == "release"
            assert not slot.exists() and FleetLockHandler.holders == set()
            assert [p for p, _, _ in FleetLockHandler.seen] == ["/v1/pre-reboot",
                                                               "/v1/steady-state"]
            agent.leave()
            after.leave()
    finally:
        server.shutdown()
