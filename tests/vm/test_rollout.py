"""A rolling update of two nodes by their agents, max-unavailable 1.

Two guests boot the installed disk (each through its own overlay, with its own
machine-id), trust the site's key, and join the host's etcd. Node b runs a libvirt
domain. The admin publishes v2 with `fleet.set_image`; both agents stage it from the
host's HTTP server (qemu guestfwd), then a takes the group's one slot, reboots into v2,
comes back healthy and releases it. b, with its domain running, takes no slot (policy
"wait") until the domain is destroyed; then it updates too. From etcd's history: the
slot never had two holders, and the two nodes' records were never gone at once.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgbase.agent import fleet
from imgbase.agent.etcd import Etcd
from imgbase.vm import GUESTFWD_ADDR, Guest, VmSpec
from tests.etcdcluster import EtcdCluster, max_holders_in_history
from tests.httpserve import serve
from tests.vm.nodes import NVR, V2

pytestmark = [pytest.mark.slow, pytest.mark.vm]

GROUP = "pair"
HTTP_PORT = 8080  # in the guest, at GUESTFWD_ADDR
AGENT_TOML = f"""[cluster]
endpoints = ["http://{GUESTFWD_ADDR}:2379"]
group = "{GROUP}"
[agent]
ttl = 15
domains = "wait"
"""
# a domain that does nothing: no disk, no network; SeaBIOS finds nothing to boot and waits
IDLE_DOMAIN = """<domain type='qemu'>
  <name>idle</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
"""


@pytest.fixture(scope="module")
def served(media_files: Path) -> Iterator[int]:
    """The update files over HTTP on the host's 127.0.0.1; the port."""
    with serve(media_files) as port:
        yield port


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest, installed_disks: dict[str, Path], served: int,
         etcd: EtcdCluster, media_files: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[dict[str, Guest]]:
    """Nodes a and b, joined to the cluster, booted side by side (one vCPU each)."""
    work = tmp_path_factory.mktemp("pair")
    fwd = ((2379, etcd.members[0].client_port), (HTTP_PORT, served))
    guests = {name: Guest(VmSpec(disk=installed_disks["minimal"], guestfwd=fwd, cpus=1,
                                 memory=1536), rundir=work / name) for name in ("a", "b")}
    request.module._imgbase_guests = list(guests.values())
    try:
        for guest in guests.values():
            guest.start()
        key = base64.b64encode((media_files / "trusted.gpg").read_bytes()).decode()
        for name, guest in guests.items():
            guest.wait_ssh()
            guest.run("rm -f /etc/machine-id && systemd-machine-id-setup >/dev/null && "
                      f"hostnamectl set-hostname node-{name} && "
                      "mkdir -p /etc/imgbase/trusted.d && "
                      f"echo {key} | base64 -d > /etc/imgbase/trusted.d/site.gpg && "
                      f"cat > /etc/imgbase/agent.toml <<'EOF'\n{AGENT_TOML}EOF\n"
                      "systemctl restart imgbase-agent")
        yield guests
    finally:
        for guest in guests.values():
            guest.kill()  # throw-away overlays: no clean shutdown to wait for


def records(admin: Etcd) -> dict[str, dict[str, Any]]:
    """The group's node records by hostname."""
    return {r["hostname"]: r for r in fleet.nodes(admin).values() if r.get("group") == GROUP}


def back_on_v2(records: dict[str, dict[str, Any]], name: str, slots: fleet.EtcdSlots) -> bool:
    """`name` is registered again, on v2, healthy, and has released its slot."""
    record = records.get(name, {})
    return bool(record.get("nvr") == V2 and record.get("healthy") and not slots.holders())


def wait_for(admin: Etcd, what: str, ok: Any, timeout: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = records(admin)
        if ok(seen):
            return seen
        time.sleep(2)
    raise AssertionError(f"{what}: not within {timeout:.0f} s; the records: {seen}")


def gone_intervals(admin: Etcd, since: int) -> dict[str, list[tuple[int, int]]]:
    """Per node key: the revision ranges in which its record was absent (a reboot)."""
    gone: dict[str, list[tuple[int, int]]] = {}
    deleted: dict[str, int] = {}
    for change in admin.changes(f"{fleet.ROOT}/nodes/", since):
        if change.value is None:
            deleted[change.key] = change.revision
        elif change.key in deleted:
            gone.setdefault(change.key, []).append((deleted.pop(change.key), change.revision))
    return gone


def test_two_nodes_update_one_at_a_time_and_a_busy_one_waits(
        pair: dict[str, Guest], etcd: EtcdCluster) -> None:
    a, b = pair["a"], pair["b"]
    with etcd.client() as admin:
        wait_for(admin, "both nodes registered and healthy", lambda r: len(r) == 2 and all(
            n["healthy"] and n["nvr"] == NVR for n in r.values()), timeout=300)
        b.run(f"cat > /tmp/idle.xml <<'EOF'\n{IDLE_DOMAIN}EOF\nvirsh -q create /tmp/idle.xml")
        wait_for(admin, "b's running domain reported",
                 lambda r: r.get("node-b", {}).get("domains") == 1, timeout=120)
        boots = {name: guest.boot_id() for name, guest in pair.items()}
        start = admin.revision() + 1
        fleet.set_image(admin, GROUP, V2, f"http://{GUESTFWD_ADDR}:{HTTP_PORT}/{V2}.squashfs", 1)

        a.wait_new_boot(boots["a"], timeout=1200)  # staged, took the slot, rebooted
        assert a.run("imgbase w").stdout.startswith(V2)
        slots = fleet.EtcdSlots(admin, GROUP)
        after_a = wait_for(admin, "a back on v2, healthy, its slot released",
                           lambda r: back_on_v2(r, "node-a", slots))
        # b staged v2 too, but holds back while its domain runs -- and stays up
        assert (after_a["node-b"]["nvr"], after_a["node-b"]["staged"]) == (NVR, V2)
        wait_for(admin, "b waiting for its domain",
                 lambda r: r.get("node-b", {}).get("action") == "wait-domains", timeout=60)
        time.sleep(20)  # a few more of b's passes: still no slot, no reboot
        assert slots.holders() == () and b.boot_id() == boots["b"]

        b.run("virsh -q destroy idle")
        b.wait_new_boot(boots["b"], timeout=900)
        assert b.run("imgbase w").stdout.startswith(V2)
        wait_for(admin, "b back on v2, healthy, its slot released",
                 lambda r: back_on_v2(r, "node-b", slots))

        assert max_holders_in_history(admin, GROUP, start) == 1  # each took it; never both
        gone = gone_intervals(admin, start)
        assert len(gone) == 2, gone  # each node left (its reboot) and came back
        [ga], [gb] = gone.values()
        assert ga[1] < gb[0] or gb[1] < ga[0], gone  # never down together
        result = fleet.status(admin)["groups"][GROUP]
        assert result["rollout"]["state"] == "running"
