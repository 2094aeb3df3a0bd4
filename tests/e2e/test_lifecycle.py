"""The life of a node, end to end, in qemu guests against the host's etcd.

v1 (the session's compose) installed by `imgbase install` onto a blank disk (the session's
installer guest, tests/vm/prepare.py) boots from its disk and its agent joins the host's
etcd, with a peer -- node b, booted from the same disk with its own machine-id, running a
libvirt domain. v2 -- a real compose with the site layer changed -- is served over HTTP
on the host's 127.0.0.1; `imgbase fleet set-image` publishes it (max-unavailable 1). Both
agents stage it; the node takes the group's one slot, reboots, and comes back healthy on
v2 with its /etc edits, a user and a disabled service carried over. b holds back while
its domain runs (policy "wait") and updates once it is destroyed -- while the admin rolls
the node back to v1 (and the agent leaves it there). From etcd's history: the slot never
had two holders, and the rollout's reboots never overlapped. b then leaves.

The admin rolls the node forward to v2 again. A
v3 that cannot boot (junk initramfs) is published with two tries: the node tries it
twice, GRUB falls back to v2 by itself, and the agent pauses the rollout. `imgbase gc`
then removes v3 and leaves the two images last found healthy.

At every stop, over SSH with testinfra: the layer is `/`, its base is read-only, `/var` is
the shared volume with its contents unchanged, libvirtd runs, `virsh` answers, and
`imgbase check` passes. The time of each phase is printed in the session summary.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imgbase.agent import fleet
from imgbase.agent.etcd import Etcd
from imgbase.vm import GUESTFWD_ADDR, Guest, VmSpec
from tests.conftest import ROOT
from tests.etcdcluster import (
    AuthCluster,
    EtcdCluster,
    auth_cluster,
    make_client_cert,
    max_holders_in_history,
)
from tests.httpserve import serve
from tests.vm.nodes import NVR, same_device
from tests.vm.prepare import E2E_MARK

pytestmark = [pytest.mark.slow, pytest.mark.vm]

V2, V3 = "imgbase-node-1.1-1", "imgbase-node-1.2-1"
GROUP = "e2e"
HTTP_PORT = 8080  # in the guest, at GUESTFWD_ADDR
LIFECYCLE_PHASES: list[tuple[str, float]] = []  # printed in the summary (tests/conftest.py)
AGENT_DIR = "/etc/imgbase/agent"
AGENT_TOML = f"""[cluster]
endpoints = ["https://{GUESTFWD_ADDR}:2379"]
group = "{GROUP}"
ca = "{AGENT_DIR}/ca.pem"
cert = "{AGENT_DIR}/node.pem"
key = "{AGENT_DIR}/node-key.pem"
user = "@USER@"
password_file = "{AGENT_DIR}/etcd-password"
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
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthCluster]:
    """The host's etcd with TLS, client certificates required and auth on: the admin is
    root, each guest an etcd user of its own (its node id) made by fleet.add_node."""
    with auth_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def etcd(secure: AuthCluster) -> EtcdCluster:
    """tests/vm/conftest.py's etcd, secured (the guests reach it through guestfwd)."""
    return secure.cluster


def join_files(secure: AuthCluster, node: str) -> str:
    """Shell that puts the node's TLS files, password and agent.toml in place."""
    password = secure.add_node(node, GROUP)
    tls = secure.cluster.tls
    assert tls is not None
    cert, key = make_client_cert(tls.ca.parent, node)
    files = {"ca.pem": tls.ca.read_bytes(), "node.pem": cert.read_bytes(),
             "node-key.pem": key.read_bytes(), "etcd-password": password.encode()}
    shell = [f"install -d -m 700 {AGENT_DIR}"]
    for name, data in files.items():
        shell.append(f"echo {base64.b64encode(data).decode()} | base64 -d > {AGENT_DIR}/{name}")
    shell.append(f"chmod 600 {AGENT_DIR}/node-key.pem {AGENT_DIR}/etcd-password")
    shell.append(f"cat > /etc/imgbase/agent.toml <<'EOF'\n"
                 f"{AGENT_TOML.replace('@USER@', node)}EOF")
    return " && ".join(shell)


@pytest.fixture(scope="module")
def served(lifecycle_images: Path) -> Iterator[int]:
    with serve(lifecycle_images) as port:
        yield port


@pytest.fixture(scope="module")
def guests(request: pytest.FixtureRequest, installed_disks: dict[str, Path], served: int,
           etcd: EtcdCluster, secure: AuthCluster, lifecycle_images: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Guest]]:
    """The node (2 vCPUs) and its peer b (1 vCPU), from the installed disk, booted side by
    side, each trusting the site's key and joined to the host's etcd."""
    work = tmp_path_factory.mktemp("e2e")
    fwd = ((2379, etcd.members[0].client_port), (HTTP_PORT, served))
    guests = {"node": Guest(VmSpec(disk=installed_disks["minimal"], guestfwd=fwd),
                            rundir=work / "node"),
              "b": Guest(VmSpec(disk=installed_disks["minimal"], guestfwd=fwd, cpus=1,
                                memory=1536), rundir=work / "b")}
    request.module._imgbase_guests = list(guests.values())
    key = base64.b64encode((lifecycle_images / "trusted.gpg").read_bytes()).decode()
    try:
        for guest in guests.values():
            guest.start()
        for name, guest in guests.items():
            guest.wait_ssh()
            own_id = ("rm -f /etc/machine-id && systemd-machine-id-setup >/dev/null && "
                      "hostnamectl set-hostname node-b && " if name == "b" else "")
            guest.run(f"{own_id}mkdir -p /etc/imgbase/trusted.d && "
                      f"echo {key} | base64 -d > /etc/imgbase/trusted.d/site.gpg && "
                      f"{join_files(secure, name)}\nsystemctl restart imgbase-agent")
        yield guests
    finally:
        for guest in guests.values():
            guest.kill()  # throw-away overlays: no clean shutdown to wait for


def fleet_cli(secure: AuthCluster, *args: str) -> str:
    """`imgbase fleet ...` on the host, as the admin (etcd's root) runs it."""
    tls = secure.cluster.tls
    assert tls is not None
    cert, key = make_client_cert(tls.ca.parent, "root")
    password = tls.ca.parent / "root-password"
    password.write_text(secure.root_password + "\n")
    proc = subprocess.run([sys.executable, "-m", "imgbase", "fleet", *args, "--endpoints",
                           secure.cluster.endpoints[0], "--ca", str(tls.ca), "--cert",
                           str(cert), "--key", str(key), "--user", "root", "--password-file",
                           str(password)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def records(admin: Etcd) -> dict[str, dict[str, Any]]:
    """The group's node records by hostname."""
    return {r["hostname"]: r for r in fleet.nodes(admin).values() if r.get("group") == GROUP}


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


def wait_for(what: str, ok: Callable[[], bool], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(2)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def state(guest: Guest) -> dict[str, Any]:
    guest.run("systemctl is-system-running --wait", check=False, timeout=300)
    result: dict[str, Any] = json.loads(guest.run("imgbase status --json").stdout)
    return result


def stop(guest: Guest, layer: str, var_marker: str) -> dict[str, Any]:
    """The node's state at a stop of its life, asserted with testinfra over SSH."""
    host = guest.host()
    st = state(guest)
    assert st["booted_layer"] == layer, st
    root = json.loads(host.check_output("findmnt -J -o SOURCE /"))["filesystems"][0]
    assert same_device(host, root["source"], f"/dev/imgbase/{layer}")
    base = layer.rsplit("+", 1)[0]
    attr = host.check_output(f"lvs --noheadings -o lv_attr imgbase/{base}").strip()
    assert attr[1] == "r", attr  # the base is read-only
    var = json.loads(host.check_output("findmnt -J -o SOURCE /var"))["filesystems"][0]
    assert same_device(host, var["source"], "/dev/imgbase/var")
    assert host.file("/var/lib/e2e-marker").content_string == var_marker  # /var: shared
    assert host.service("libvirtd").is_running
    caps = host.check_output("virsh -c qemu:///system capabilities")
    assert "<host>" in caps and "x86_64" in caps
    check = json.loads(host.check_output("imgbase check --json"))
    assert check["ok"], [c for c in check["checks"] if not c["ok"]]
    # the VMs' bridge, written at install, carried by every update and rollback
    assert [(b["name"], bool(b["addresses"]), len(b["ports"]))
            for b in st["network"]["bridges"]] == [("br0", True, 1)], st["network"]
    return st


def phase(name: str, since: float) -> float:
    now = time.monotonic()
    LIFECYCLE_PHASES.append((name, now - since))
    return now


def test_the_life_of_a_node(guests: dict[str, Guest], secure: AuthCluster,
                            served: int) -> None:
    node, b = guests["node"], guests["b"]
    url = f"http://{GUESTFWD_ADDR}:{HTTP_PORT}"  # images: signed, so http will do
    t = time.monotonic()
    # -- v1, installed onto a blank disk, joins the cluster with its peer b ----------
    marker = f"written on {NVR}\n"
    node.run(f"printf '{marker}' > /var/lib/e2e-marker && "
             "echo 'local edit' >> /etc/motd && useradd -u 1234 alice && "
             "systemctl disable imgbase-selfcheck.service && "
             "imgbase kargs --append imgbase.test=e2e")
    me = node.run("hostname").stdout.strip()
    assert me != "node-b"

    def mine() -> dict[str, Any]:
        return records(admin).get(me, {})

    with secure.admin() as admin:
        wait_for("both registered and healthy on v1", lambda: len(records(admin)) == 2 and all(
            r.get("nvr") == NVR and r.get("healthy") is True for r in records(admin).values()),
            timeout=300)
        assert mine()["capabilities"]["arch"] == "x86_64"
        b.run(f"cat > /tmp/idle.xml <<'EOF'\n{IDLE_DOMAIN}EOF\nvirsh -q create /tmp/idle.xml")
        wait_for("b's running domain reported",
                 lambda: records(admin).get("node-b", {}).get("domains") == 1, timeout=120)
        stop(node, f"{NVR}+1", marker)
        t = phase("v1 up, node and b registered, b runs a domain, checked", t)

        # -- v2 through the fleet: both stage; the node takes the slot, reboots ----------
        boots = {"node": node.boot_id(), "b": b.boot_id()}
        start = admin.revision() + 1
        fleet_cli(secure, "set-image", V2, f"{url}/{V2}.squashfs", "--group", GROUP,
                  "--max-unavailable", "1", "--insecure-http")  # signed images over http
        node.wait_new_boot(boots["node"], timeout=1200)
        t = phase("v2 staged by both, the node took the slot, rebooted", t)
        slots = fleet.EtcdSlots(admin, GROUP)
        wait_for("back on v2, healthy, slot released", lambda: mine().get("nvr") == V2
                 and mine().get("healthy") is True and not slots.holders())
        st = stop(node, f"{V2}+1", marker)
        host = node.host()
        assert "local edit" in host.file("/etc/motd").content_string  # carried over
        assert host.user("alice").uid == 1234  # users: no UID drift
        assert not host.service("imgbase-selfcheck").is_enabled  # stays disabled
        assert "imgbase.test=e2e" in host.file("/proc/cmdline").content_string.split()
        assert host.file(f"/{E2E_MARK}").content_string == "site layer of v2\n"  # the layer
        assert [b["name"] for b in st["bases"]] == [NVR, V2]
        t = phase("v2 healthy on the node, its state carried over, checked", t)

        # -- b staged v2 too, but holds back while its domain runs -- and stays up -------
        wait_for("b waiting for its domain", lambda: records(admin).get("node-b", {}).get(
            "action") == "wait-domains", timeout=60)
        peer = records(admin)["node-b"]
        assert (peer["nvr"], peer["staged"]) == (NVR, V2)
        assert slots.holders() == () and b.boot_id() == boots["b"]
        b.run("virsh -q destroy idle")  # now b takes the slot and reboots into v2 ...
        rolled_back_at = admin.revision() + 1

        # -- ... while the admin rolls the node back to v1: the agent leaves it there ----
        node.run("imgbase rollback")
        node.reboot()
        stop(node, f"{NVR}+1", marker)
        wait_for("v1 registered again", lambda: mine().get("nvr") == NVR)
        registered = time.monotonic()
        b.wait_new_boot(boots["b"], timeout=900)
        wait_for("b back on v2, healthy, its slot released", lambda: records(admin).get(
            "node-b", {}).get("nvr") == V2 and records(admin)["node-b"].get("healthy") is True
            and not slots.holders())
        time.sleep(max(0.0, registered + 12 - time.monotonic()))  # 2+ agent passes (5 s)
        assert state(node)["default_layer"] == f"{NVR}+1"  # not rolled forward again
        assert mine()["nvr"] == NVR and not slots.holders()
        assert max_holders_in_history(admin, GROUP, start) == 1  # each took it; never both
        # the reboots the rollout made -- each node's first time away -- never overlapped
        # (the admin's rollback, the node's second, is no rollout's business)
        gone = gone_intervals(admin, start)
        assert len(gone) == 2, gone  # each node left (its reboot) and came back
        one, other = (spans[0] for spans in gone.values())
        assert min(one[0], other[0]) < rolled_back_at, gone  # the node's v2 reboot
        assert one[1] < other[0] or other[1] < one[0], gone  # never down together
        group = json.loads(fleet_cli(secure, "status", "--json"))["groups"][GROUP]
        assert len(group["nodes"]) == 2 and group["rollout"]["state"] == "running", group
        b.kill()  # b's part is done; its record goes when its lease runs out
        t = phase("b updated once the node was back; meanwhile the admin rolled the node "
                  "back to v1, rebooted, checked", t)

        # -- and forward to v2 (the last good layer other than the booted one) -----------
        node.run("imgbase rollback")
        node.reboot()
        stop(node, f"{V2}+1", marker)
        t = phase("rolled forward to v2, rebooted, checked", t)

        # -- v3 cannot boot: tried, abandoned by GRUB's counter, back on v2 by itself ----
        boot = node.boot_id()
        resets = node.resets
        fleet_cli(secure, "set-image", V3, f"{url}/{V3}.squashfs", "--group", GROUP,
                  "--tries", "2", "--insecure-http")
        node.wait_new_boot(boot, timeout=1500)
        st = stop(node, f"{V2}+1", marker)
        assert node.resets - resets >= 3, node.resets  # the reboot into v3, 2 failed tries
        [abandoned] = st["abandoned"]
        assert abandoned["layer"] == f"{V3}+1" and "did not come up" in abandoned["reason"]
        wait_for("the rollout paused by the node's report", lambda: json.loads(fleet_cli(
            secure, "status", "--json"))["groups"][GROUP]["rollout"].get("state") == "paused")
        rollout = json.loads(fleet_cli(secure, "status", "--json"))["groups"][GROUP]["rollout"]
        assert f"fell back from {V3}" in rollout["reason"], rollout
        assert mine()["nvr"] == V2 and not fleet.EtcdSlots(admin, GROUP).holders()
        # the admin collects garbage: v3, never found healthy, goes -- its base, layer,
        # boot files and menu entry -- and the two images last found healthy stay
        node.run("imgbase gc")
        st = state(node)
        assert [b["name"] for b in st["bases"]] == [NVR, V2], st["bases"]
        assert f"{V3}+1" not in [la["name"] for la in st["layers"]]
        assert node.run(f"test -e /boot/{V3}+1", check=False).rc == 1
        assert f"{V3}+1" not in node.run("cat /boot/grub/imgbase-entries.cfg").stdout
        phase("v3 tried, fell back to v2 by itself, rollout paused, gc left two images", t)
