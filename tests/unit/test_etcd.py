"""The etcd client against real etcd servers on 127.0.0.1 (tests/etcdcluster.py): keys,
prefixes, leases (keep-alive, expiry, revoke), compare-and-swap transactions, history
through the watch API, TLS with client certificates, and failover between members."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from imgbase.agent import etcd as etcd_module
from imgbase.agent.etcd import (
    Change,
    Delete,
    Entry,
    Etcd,
    EtcdError,
    Put,
    Range,
    Value,
    absent,
    exists,
    mod_revision_is,
    value_is,
)
from imgbase.errors import ImgbaseError, InputError
from tests.etcdcluster import EtcdCluster, etcd_cluster, free_ports


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd-single"), 1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd-trio"), 3) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd-tls"), 1, tls=True,
                      client_cert_auth=True) as cluster:
        yield cluster


@pytest.fixture
def client(single: EtcdCluster) -> Iterator[Etcd]:
    with single.client() as c:
        yield c


# --- keys ----------------------------------------------------------------------------


def test_put_get_delete(client: Etcd) -> None:
    r1 = client.put("kv/a", "1")
    r2 = client.put("kv/a", "2")
    assert r2 > r1 > 0
    assert client.get("kv/a") == Value("2", r2)
    assert client.get("kv/a", revision=r1) == ("1", r1)
    assert client.get("kv/none") is None
    # str in, str out: UTF-8 and empty values survive the base64 of the gateway
    r3 = client.put("kv/ünï", "välue ✓")
    r4 = client.put("kv/empty", "")
    assert client.get("kv/ünï") == ("välue ✓", r3)
    assert client.get("kv/empty") == ("", r4)
    assert [e.key for e in client.get_prefix("kv/")] == ["kv/a", "kv/empty", "kv/ünï"]
    assert client.delete("kv/a") == 1
    assert client.delete("kv/a") == 0
    assert client.get("kv/a") is None


def test_prefix_reads_and_deletes_only_under_the_prefix(client: Etcd) -> None:
    revs = {key: client.put(key, key.upper()) for key in
            ("px/b", "px/a", "px/c/d", "px0", "pw/z", "px")}
    rev = client.revision()
    entries = client.get_prefix("px/")
    assert [(e.key, e.value) for e in entries] == [
        ("px/a", "PX/A"), ("px/b", "PX/B"), ("px/c/d", "PX/C/D")]
    assert all(isinstance(e, Entry) and e.lease == 0 and e.mod_revision <= rev for e in entries)
    client.put("px/a", "changed")
    assert client.get_prefix("px/", revision=rev)[0].value == "PX/A"  # the past, as it was
    assert client.delete_prefix("px/") == 3
    assert client.get_prefix("px/") == []
    assert client.get("px0") == ("PX0", revs["px0"])  # outside "px/": untouched
    assert client.get("px") == ("PX", revs["px"])


def test_a_long_prefix_is_read_in_pages_as_one_snapshot(
    client: Etcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(7):
        client.put(f"page/{i}", str(i))
    monkeypatch.setattr(etcd_module, "PAGE_SIZE", 3)
    assert [e.value for e in client.get_prefix("page/")] == [str(i) for i in range(7)]


def test_gateway_errors_become_etcd_errors(client: Etcd) -> None:
    with pytest.raises(EtcdError, match="required revision is a future revision") as e:
        client.get("kv/x", revision=client.revision() + 1000)
    assert e.value.code == 11 and isinstance(e.value, ImgbaseError)
    with pytest.raises(EtcdError, match="etcd: requested lease not found") as e:
        client.put("kv/x", "v", lease=12345)
    assert e.value.hint == "the lease expired or was revoked; grant a new one"
    assert client.lease_revoke(12345) is False
    # an HTTP server that is not etcd's gateway: a clear error, not a JSON traceback
    base = client.endpoint
    with Etcd([base + "/not-etcd"]) as wrong, pytest.raises(EtcdError, match="HTTP 404") as e:
        wrong.get("kv/x")
    assert "etcd >= 3.4" in (e.value.hint or "")


def test_bad_arguments_are_input_errors() -> None:
    with pytest.raises(InputError, match="no etcd endpoint given"):
        Etcd([])
    with pytest.raises(InputError, match="not an http:// or https:// URL"):
        Etcd(["127.0.0.1:2379"])
    with pytest.raises(InputError, match="both its certificate and its key"):
        Etcd(["https://127.0.0.1:2379"], cert="/x.crt")
    with pytest.raises(InputError, match="etcd CA file /nonexistent/ca.crt does not exist"):
        Etcd(["https://127.0.0.1:2379"], ca="/nonexistent/ca.crt")


# --- leases --------------------------------------------------------------------------


def test_keepalive_keeps_a_lease_then_expiry_removes_its_keys(client: Etcd) -> None:
    lease = client.lease_grant(1)
    # etcd raises a TTL below its minimum (1.5 election timeouts: 2 s with the default
    # 1 s election timeout): the granted TTL is the one to wait on.
    info = client.lease_time_to_live(lease)
    assert info is not None
    ttl = info.granted_ttl
    assert 1 <= ttl <= 3, info
    client.put("lease/a", "x", lease=lease)
    client.put("lease/b", "y", lease=lease)
    assert {e.key: e.lease for e in client.get_prefix("lease/")} == {
        "lease/a": lease, "lease/b": lease}

    until = time.monotonic() + ttl + 1.0  # longer than the TTL: only keep-alives keep it
    while time.monotonic() < until:
        assert client.lease_keepalive(lease) == ttl
        time.sleep(0.4)
    assert len(client.get_prefix("lease/")) == 2

    assert client.lease_keepalive(lease) == ttl
    last_renewal = time.monotonic()
    deadline = last_renewal + ttl + 5.0
    while client.get_prefix("lease/") and time.monotonic() < deadline:
        time.sleep(0.1)
    gone_after = time.monotonic() - last_renewal
    assert client.get_prefix("lease/") == [], f"keys still there {gone_after:.1f} s after"
    assert gone_after >= ttl - 0.5, f"lease of {ttl} s expired after {gone_after:.1f} s"
    assert client.lease_keepalive(lease) == 0
    assert client.lease_time_to_live(lease) is None
    assert client.lease_revoke(lease) is False


def test_revoke_removes_the_keys_at_once(client: Etcd) -> None:
    lease = client.lease_grant(60)
    client.put("revoke/a", "1", lease=lease)
    client.put("revoke/b", "2", lease=lease)
    client.put("revoke/keep", "3")
    assert client.lease_revoke(lease) is True
    assert [e.key for e in client.get_prefix("revoke/")] == ["revoke/keep"]
    assert client.lease_keepalive(lease) == 0


# --- transactions --------------------------------------------------------------------


def test_create_if_absent_succeeds_once(client: Etcd) -> None:
    lease = client.lease_grant(60)
    ok, (put,) = client.txn([absent("sem/slot0")], [Put("sem/slot0", "node-a", lease)],
                            [Range("sem/slot0")])
    assert ok and put.kind == "put"
    assert client.get("sem/slot0") == ("node-a", put.revision)

    ok, (holder,) = client.txn([absent("sem/slot0")], [Put("sem/slot0", "node-b", lease)],
                               [Range("sem/slot0")])
    assert not ok and holder.kind == "range"
    assert [(e.key, e.value, e.lease) for e in holder.entries] == [
        ("sem/slot0", "node-a", lease)]
    assert client.get("sem/slot0") == ("node-a", put.revision)  # unchanged
    client.lease_revoke(lease)


def test_compare_and_swap_on_value_and_revision(client: Etcd) -> None:
    rev = client.put("cas/k", "a")
    assert client.txn([value_is("cas/k", "b")], [Put("cas/k", "c")]).succeeded is False
    ok, (put,) = client.txn([value_is("cas/k", "a")], [Put("cas/k", "b")])
    assert ok and client.get("cas/k") == ("b", put.revision)
    # a writer holding the old revision loses
    assert client.txn([mod_revision_is("cas/k", rev)], [Put("cas/k", "stale")]).succeeded is False
    assert client.txn([exists("cas/k"), mod_revision_is("cas/k", put.revision)],
                      [Delete("cas/k")]).responses[0].deleted == 1
    assert client.get("cas/k") is None
    assert client.txn([exists("cas/k")], [], [Range("cas/k")]) == (
        False, [etcd_module.OpResult("range", client.revision(), [], 0)])


def test_a_semaphore_of_two_slots_admits_two_of_three(client: Etcd) -> None:
    """The pattern the agent's update semaphore uses: take the first free slot."""
    leases = {node: client.lease_grant(60) for node in ("n1", "n2", "n3")}

    def acquire(node: str) -> str | None:
        for slot in ("upd/0", "upd/1"):
            ok, _ = client.txn([absent(slot)], [Put(slot, node, leases[node])])
            if ok:
                return slot
        return None

    assert [acquire(n) for n in ("n1", "n2", "n3")] == ["upd/0", "upd/1", None]
    client.lease_revoke(leases["n1"])  # n1 dies: its slot frees itself
    assert acquire("n3") == "upd/0"
    assert {e.key: e.value for e in client.get_prefix("upd/")} == {"upd/0": "n3", "upd/1": "n2"}
    for lease in leases.values():
        client.lease_revoke(lease)


# --- history -------------------------------------------------------------------------


def test_changes_lists_puts_and_deletes_in_revision_order(client: Etcd) -> None:
    start = client.revision() + 1
    r1 = client.put("hist/a", "1")
    r2 = client.put("hist/b", "1")
    client.put("other/x", "not under the prefix")
    assert client.delete("hist/a") == 1
    r3 = client.revision()
    r4 = client.put("hist/b", "2")
    assert client.txn([], [Put("hist/c", "3"), Delete("hist/b")]).succeeded
    r5 = client.revision()
    client.put("other/y", "after the last change under the prefix")

    assert client.changes("hist/", start) == [
        Change(r1, "hist/a", "1"),
        Change(r2, "hist/b", "1"),
        Change(r3, "hist/a", None),
        Change(r4, "hist/b", "2"),
        Change(r5, "hist/c", "3"),  # one transaction: one revision, two events
        Change(r5, "hist/b", None),
    ]
    assert client.changes("hist/", r4) == client.changes("hist/", start)[3:]
    assert client.changes("hist/", client.revision() + 1) == []  # nothing yet
    assert client.changes("nothing/", start) == []

    # history before a compaction is gone, and says so
    resp = requests.post(client.endpoint + "/v3/kv/compaction", json={"revision": str(r4)},
                         timeout=5)
    assert resp.status_code == 200, resp.text
    with pytest.raises(EtcdError, match=f"compacted it up to revision {r4}") as e:
        client.changes("hist/", start)
    assert e.value.hint == f"ask for the changes from revision {r4} on"
    assert client.changes("hist/", r4)[0] == Change(r4, "hist/b", "2")
    with pytest.raises(EtcdError, match="required revision has been compacted"):
        client.get("hist/b", revision=r2)


# --- TLS -----------------------------------------------------------------------------


def test_tls_with_a_client_certificate(tls_server: EtcdCluster) -> None:
    assert tls_server.endpoints[0].startswith("https://127.0.0.1:")
    with tls_server.client() as c:
        rev = c.put("tls/k", "v")
        assert c.get("tls/k") == ("v", rev)
        assert c.changes("tls/", rev) == [Change(rev, "tls/k", "v")]
        assert c.lease_keepalive(c.lease_grant(30)) > 0


def test_tls_without_a_client_certificate_is_refused_clearly(tls_server: EtcdCluster) -> None:
    with tls_server.client(cert=False) as c, pytest.raises(EtcdError) as e:
        c.put("tls/k", "nope")
    # etcd ends the session with an alert or, as often, without one: the same message
    assert e.value.message.startswith(f"no etcd endpoint answered: {tls_server.endpoints[0]} "
                                      "(TLS: the member requires a client certificate and "
                                      "none was given (")
    assert "client certificate" in (e.value.hint or "")


def test_tls_with_an_unknown_ca_is_refused_clearly(tls_server: EtcdCluster) -> None:
    assert tls_server.tls is not None
    with Etcd(tls_server.endpoints, cert=tls_server.tls.client_cert,
              key=tls_server.tls.client_key) as c, pytest.raises(EtcdError) as e:
        c.get("tls/k")  # verified against the system's CAs, which never signed it
    assert "TLS: the member's certificate is not trusted" in e.value.message
    assert "CA" in (e.value.hint or "")


# --- failover ------------------------------------------------------------------------


def test_status_and_member_list(trio: EtcdCluster) -> None:
    with trio.client() as c:
        members = sorted(c.member_list(), key=lambda m: m.name)
        assert [(m.name, m.client_urls) for m in members] == [
            (f"m{i}", [url]) for i, url in enumerate(trio.endpoints)]
        statuses = [c.status(url) for url in trio.endpoints]
    assert {s.member_id for s in statuses} == {m.id for m in members}
    assert len({s.leader for s in statuses}) == 1  # all agree
    assert sum(s.is_leader for s in statuses) == 1
    assert all(s.version.startswith("3.") for s in statuses)


def test_a_dead_member_is_skipped_and_the_next_one_remembered(trio: EtcdCluster) -> None:
    leader = trio.leader_index()
    follower = (leader + 1) % 3
    order = [follower] + [i for i in range(3) if i != follower]
    with trio.client([trio.endpoints[i] for i in order]) as c:
        c.put("fo/k", "before")
        assert c.endpoint == trio.endpoints[follower]
        trio.kill_member(follower)
        try:
            value = c.get("fo/k")
            assert value is not None and value.value == "before"
            moved_to = c.endpoint
            assert moved_to != trio.endpoints[follower]
            rev = c.put("fo/k", "while one member is down")
            assert c.endpoint == moved_to  # remembered: no new attempt at the dead one
        finally:
            trio.restart_member(follower)
    with trio.client([trio.endpoints[follower]]) as back:
        assert back.get("fo/k") == ("while one member is down", rev)


def test_the_client_moves_on_when_the_leader_dies(trio: EtcdCluster) -> None:
    leader = trio.leader_index()
    order = [leader] + [i for i in range(3) if i != leader]
    with trio.client([trio.endpoints[i] for i in order]) as c:
        c.put("fo/leader", "1")
        trio.kill_member(leader)
        try:
            # Until the two others elect a leader (about one election timeout), etcd itself
            # cannot serve linearizable requests; the client is not a retry loop.
            new_leader = trio.leader_index()
            assert new_leader != leader
            c.put("fo/leader", "2")
            assert c.get("fo/leader") is not None and c.endpoint != trio.endpoints[leader]
        finally:
            trio.restart_member(leader)


def test_no_endpoint_answering_is_one_clear_error() -> None:
    ports = free_ports(2)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    with Etcd(urls, timeout=2) as c:
        for call in (lambda: c.get("k"), lambda: c.put("k", "v")):
            with pytest.raises(EtcdError) as e:
                call()
            assert e.value.message == (
                f"no etcd endpoint answered: {urls[0]} (connection refused); "
                f"{urls[1]} (connection refused)")
            assert "check that etcd runs on the members" in (e.value.hint or "")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung member)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join()
    for s in held:
        s.close()
    srv.close()


def test_a_hung_member_reads_fail_over_but_writes_do_not_repeat(
    single: EtcdCluster, silent_port: int
) -> None:
    hung = f"http://127.0.0.1:{silent_port}"
    with Etcd([hung, single.endpoints[0]], timeout=0.5) as c:
        assert c.get("nothing/here") is None  # a read is safe to ask elsewhere
        assert c.endpoint == single.endpoints[0]
    with Etcd([hung, single.endpoints[0]], timeout=0.5) as c, pytest.raises(EtcdError) as e:
        c.put("hung/k", "v")  # it may have been applied: not sent a second time
    assert e.value.message.startswith(f"etcd at {hung} did not answer in time during "
                                      "/v3/kv/put: the change may or may not have been applied")
    assert e.value.hint == "read the keys back before trying again"
    with single.client() as check:
        assert check.get("hung/k") is None
