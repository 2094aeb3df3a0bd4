"""The life of a node, end to end, in one qemu guest against the host's etcd.

v1 (the session's compose) installed by `imgbase install` onto a blank disk (the session's
installer guest, tests/vm/prepare.py) boots from its disk and its agent joins the host's
etcd. v2 -- a real compose with the site layer changed -- is served over HTTP on the
host's 127.0.0.1; `imgbase fleet set-image` publishes it. The agent stages it, takes the
slot, reboots, and comes back healthy on v2 with the node's /etc edits. The admin rolls
back to v1 (and the agent leaves it there), then forward to v2 again. A v3 that cannot
boot (junk initramfs) is published: the node tries it, GRUB falls back to v2 by itself,
and the agent pauses the rollout.

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
from tests.etcdcluster import EtcdCluster
from tests.httpserve import serve
from tests.vm.nodes import NVR, same_device
from tests.vm.prepare import E2E_MARK

pytestmark = [pytest.mark.slow, pytest.mark.vm]

V2, V3 = "imgbase-node-1.1-1", "imgbase-node-1.2-1"
GROUP = "e2e"
HTTP_PORT = 8080  # in the guest, at GUESTFWD_ADDR
LIFECYCLE_PHASES: list[tuple[str, float]] = []  # printed in the summary (tests/conftest.py)
AGENT_TOML = f"""[cluster]
endpoints = ["http://{GUESTFWD_ADDR}:2379"]
group = "{GROUP}"
[agent]
ttl = 15
"""


@pytest.fixture(scope="module")
def served(lifecycle_images: Path) -> Iterator[int]:
    with serve(lifecycle_images) as port:
        yield port


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest, installed_disks: dict[str, Path], served: int,
         etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    fwd = ((2379, etcd.members[0].client_port), (HTTP_PORT, served))
    guest = Guest(VmSpec(disk=installed_disks["minimal"], guestfwd=fwd),
                  rundir=tmp_path_factory.mktemp("e2e") / "node")
    request.module._imgbase_guests = [guest]
    try:
        guest.start()
        guest.wait_ssh()
        yield guest
    finally:
        guest.kill()  # a throw-away overlay: no clean shutdown to wait for


def fleet_cli(etcd: EtcdCluster, *args: str) -> str:
    """`imgbase fleet ...` on the host, as an admin runs it."""
    proc = subprocess.run([sys.executable, "-m", "imgbase", "fleet", *args, "--endpoints",
                           f"http://127.0.0.1:{etcd.members[0].client_port}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def record(admin: Etcd) -> dict[str, Any]:
    found = [r for r in fleet.nodes(admin).values() if r.get("group") == GROUP]
    return found[0] if found else {}


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
    return st


def phase(name: str, since: float) -> float:
    now = time.monotonic()
    LIFECYCLE_PHASES.append((name, now - since))
    return now


def test_the_life_of_a_node(node: Guest, etcd: EtcdCluster, lifecycle_images: Path,
                            served: int) -> None:
    url = f"http://{GUESTFWD_ADDR}:{HTTP_PORT}"
    t = time.monotonic()
    # -- v1, installed onto a blank disk, joins the cluster ---------------------------
    key = base64.b64encode((lifecycle_images / "trusted.gpg").read_bytes()).decode()
    marker = f"written on {NVR}\n"
    node.run("mkdir -p /etc/imgbase/trusted.d && "
             f"echo {key} | base64 -d > /etc/imgbase/trusted.d/site.gpg && "
             f"cat > /etc/imgbase/agent.toml <<'EOF'\n{AGENT_TOML}EOF\n"
             f"printf '{marker}' > /var/lib/e2e-marker && "
             "echo 'local edit' >> /etc/motd && systemctl restart imgbase-agent")
    with etcd.client() as admin:
        wait_for("v1 registered and healthy", lambda: record(admin).get("nvr") == NVR
                 and record(admin).get("healthy") is True, timeout=120)
        assert record(admin)["capabilities"]["arch"] == "x86_64"
        stop(node, f"{NVR}+1", marker)
        t = phase("v1 up, agent registered, checked", t)

        # -- v2 through the fleet: stage, slot, reboot, healthy ---------------------------
        boot = node.boot_id()
        fleet_cli(etcd, "set-image", V2, f"{url}/{V2}.squashfs", "--group", GROUP)
        node.wait_new_boot(boot, timeout=1200)
        t = phase("v2 staged by the agent, slot taken, rebooted", t)
        wait_for("back on v2, healthy, slot released", lambda: record(admin).get("nvr") == V2
                 and record(admin).get("healthy") is True
                 and not fleet.EtcdSlots(admin, GROUP).holders())
        st = stop(node, f"{V2}+1", marker)
        host = node.host()
        assert "local edit" in host.file("/etc/motd").content_string  # carried over
        assert host.file(f"/{E2E_MARK}").content_string == "site layer of v2\n"  # the layer
        assert [b["name"] for b in st["bases"]] == [NVR, V2]
        group = json.loads(fleet_cli(etcd, "status", "--json"))["groups"][GROUP]
        assert group["on_desired"] == group["nodes"] and len(group["nodes"]) == 1, group
        t = phase("v2 healthy, checked", t)

        # -- the admin rolls back to v1: the agent leaves the node there -----------------
        node.run("imgbase rollback")
        node.reboot()
        stop(node, f"{NVR}+1", marker)
        wait_for("v1 registered again", lambda: record(admin).get("nvr") == NVR)
        time.sleep(20)  # several agent passes (ttl 15: one every 5 s)
        assert state(node)["default_layer"] == f"{NVR}+1"  # not rolled forward again
        assert record(admin)["nvr"] == NVR and not fleet.EtcdSlots(admin, GROUP).holders()
        t = phase("rolled back to v1, rebooted, checked", t)

        # -- and forward to v2 (the last good layer other than the booted one) -----------
        node.run("imgbase rollback")
        node.reboot()
        stop(node, f"{V2}+1", marker)
        t = phase("rolled forward to v2, rebooted, checked", t)

        # -- v3 cannot boot: tried, abandoned by GRUB's counter, back on v2 by itself ----
        boot = node.boot_id()
        resets = node.resets
        fleet_cli(etcd, "set-image", V3, f"{url}/{V3}.squashfs", "--group", GROUP)
        node.wait_new_boot(boot, timeout=1500)
        st = stop(node, f"{V2}+1", marker)
        assert node.resets - resets >= 4, node.resets  # the reboot into v3, 3 failed tries
        [abandoned] = st["abandoned"]
        assert abandoned["layer"] == f"{V3}+1" and "did not come up" in abandoned["reason"]
        wait_for("the rollout paused by the node's report", lambda: json.loads(fleet_cli(
            etcd, "status", "--json"))["groups"][GROUP]["rollout"].get("state") == "paused")
        rollout = json.loads(fleet_cli(etcd, "status", "--json"))["groups"][GROUP]["rollout"]
        assert f"fell back from {V3}" in rollout["reason"], rollout
        assert record(admin)["nvr"] == V2 and not fleet.EtcdSlots(admin, GROUP).holders()
        # the admin clears the broken layer away: LV, boot files and menu entry
        node.run(f"imgbase layer --remove {V3}+1")
        assert f"{V3}+1" not in [la["name"] for la in state(node)["layers"]]
        assert node.run(f"test -e /boot/{V3}+1", check=False).rc == 1
        assert f"{V3}+1" not in node.run("cat /boot/grub/imgbase-entries.cfg").stdout
        phase("v3 tried, fell back to v2 by itself, rollout paused, cleared, checked", t)
