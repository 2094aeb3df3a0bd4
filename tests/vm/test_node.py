"""The life of the node `imgbase install` made on a blank disk, in one guest booting that
disk throughout (through a throw-away overlay).

First as installed: it runs from its layer with the base read-only and /var apart; every
`imgbase check` can fail (each test breaks one thing, asserts that exactly that check
fails, and mends it); the booted layer cannot be removed; an interrupted operation is
cleaned up by `recover`. Its agent joins the host's etcd.

Then A/B boot: next boot once, kernel arguments carried to a new layer, a layer that does
not come up healthy abandoned by the node itself through GRUB's boot counter (one that
does not come up at all: tests/e2e). Then updates from signed images on "update media"
attached as /dev/vdb: refusals that change nothing, v1 -> v2 (a delta base, verified byte
for byte), then v3 over it through the apt-installed update package; the node boots v3
with /etc edits, a user, a disabled service and kargs carried over, and garbage
collection keeps the two images found healthy (rollbacks, through reboots: tests/e2e).
Then its root is broken and `imgbase reset` gives it a fresh layer, still the same node.
Last, the power goes, and the node's record leaves the cluster with its lease.

The node boots under UEFI with Secure Boot throughout (a layer whose kernel lost its
signature is refused by GRUB through shim, and the node falls back by itself).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from imgbase.agent import fleet
from imgbase.vm import Guest
from tests.conftest import ROOT
from tests.etcdcluster import EtcdCluster
from tests.vm.nodes import MEDIA, NVR, V2, V3, module_node, mount_media, same_device

pytestmark = [pytest.mark.slow, pytest.mark.vm]

A, B = f"{NVR}+1", f"{NVR}+2"
LAYER = A  # the installed node's first layer
ENTRIES = "/boot/grub/imgbase-entries.cfg"




@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest, installed_disks: dict[str, Path], media: Path,
         etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    fwd = ((2379, etcd.members[0].client_port),)
    # UEFI with Secure Boot, Microsoft's keys enrolled, as a server ships: every boot of
    # this module's life goes shim -> signed grub -> signed kernel (BIOS: test_install,
    # tests/e2e; the NVRAM entry and the removable path: test_uefi)
    for guest in module_node(request, installed_disks["minimal"],
                             tmp_path_factory.mktemp("life") / "run", attach=(media,),
                             guestfwd=fwd, firmware="secureboot"):
        mount_media(guest)
        yield guest


def status(guest: Guest) -> dict[str, Any]:
    guest.run("systemctl is-system-running --wait", check=False)  # health has run
    result: dict[str, Any] = json.loads(guest.run("imgbase status --json").stdout)
    return result


def without_usage(value: Any) -> Any:
    """status --json minus the live usage figures (pool and volume fill), which move on
    their own; what remains must not change when an operation is refused."""
    if isinstance(value, dict):
        return {k: without_usage(v) for k, v in value.items() if not k.endswith("_percent")}
    if isinstance(value, list):
        return [without_usage(v) for v in value]
    return value


def layer(st: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(la for la in st["layers"] if la["name"] == name)
    return found


def boots_in_serial_log(guest: Guest) -> int:
    return guest.serial_log.read_text(errors="replace").count("Linux version ")


def wait_back_on(guest: Guest, name: str, timeout: float = 900) -> None:
    """Wait (through reboots the guest does by itself) until it is up on layer name with
    no trial pending."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            guest.wait_ssh(timeout=timeout - (time.monotonic() - t0))
            guest.run("systemctl is-system-running --wait", check=False, timeout=300)
            st = json.loads(guest.run("imgbase status --json", timeout=60).stdout)
            if st["booted_layer"] == name and st["fallback_layer"] is None:
                return
        except Exception:  # noqa: BLE001 - the guest went down under us: try again
            pass
        time.sleep(5)
    raise AssertionError(f"the guest did not come back on {name} within {timeout:.0f} s")


def check(guest: Guest) -> dict[str, dict[str, object]]:
    proc = guest.run("imgbase check --json", check=False)
    report = json.loads(proc.stdout)
    assert proc.rc == (0 if report["ok"] else 1)
    return {c["name"]: c for c in report["checks"]}


# (check, how to break it, how to put it back, other checks that fail along with it)
BREAKS = [
    ("vg", "vgchange --deltag imgbase:vg imgbase", "vgchange --addtag imgbase:vg imgbase",
     {"pool", "bases", "layers", "pool-data", "pool-metadata", "autoextend", "var", "booted"}),
    ("pool", "lvchange --deltag imgbase:pool imgbase/pool",
     "lvchange --addtag imgbase:pool imgbase/pool",
     {"pool-data", "pool-metadata", "autoextend"}),
    ("bases", f"lvchange -y --permission rw imgbase/{NVR}",
     f"lvchange -y --permission r imgbase/{NVR}", set()),
    ("layers", "lvcreate -q -y -V 1G -T imgbase/pool -n stray --addtag imgbase:layer",
     "lvremove -q -y imgbase/stray", set()),
    ("pool-data", "mkdir -p /etc/imgbase && echo '[check]\npool_data_max = 0.01' "
     "> /etc/imgbase/imgbase.toml", "rm /etc/imgbase/imgbase.toml", set()),
    ("pool-metadata", "mkdir -p /etc/imgbase && echo '[check]\npool_metadata_max = 0.01' "
     "> /etc/imgbase/imgbase.toml", "rm /etc/imgbase/imgbase.toml", set()),
    ("autoextend", "lvchange --detachprofile imgbase/pool",
     "lvchange --metadataprofile imgbase-thin imgbase/pool", set()),
    ("autoextend", "lvchange --monitor n imgbase/pool", "lvchange --monitor y imgbase/pool",
     set()),
    ("var", "mkdir -p /run/fakevar && mount --bind /run/fakevar /var", "umount /var",
     {"discard"}),  # the tmpfs now on /var has no discard either
    ("discard", "mount -o remount,nodiscard /", "mount -o remount,discard /", set()),
    ("boot-entries", f"lvcreate -q -y -s -kn -n {NVR}+7 --addtag imgbase:layer imgbase/{NVR}",
     f"lvremove -q -y imgbase/{NVR}+7", set()),
    ("boot-entries", f"cp {ENTRIES} /run/entries && printf \"menuentry 'x' --id '{NVR}+9' "
     f"{{\\n}}\\n\" >> {ENTRIES}", f"mv /run/entries {ENTRIES}", set()),
    ("boot-entries", f"mv /boot/{LAYER}/vmlinuz /run/vmlinuz",
     f"mv /run/vmlinuz /boot/{LAYER}/vmlinuz", set()),  # an entry pointing at no kernel
    ("boot-entries", f"cp {ENTRIES} /run/entries && echo 'menuentry {{ garbage' >> {ENTRIES}",
     f"mv /run/entries {ENTRIES}", set()),  # edited into nonsense: reported, not a crash
    ("booted", f"lvchange --deltag imgbase:layer imgbase/{LAYER}",
     f"lvchange --addtag imgbase:layer imgbase/{LAYER}", {"layers", "boot-entries"}),
    ("incomplete", "lvchange --addtag imgbase:incomplete imgbase/var",
     "lvchange --deltag imgbase:incomplete imgbase/var", set()),
    ("esp", "umount /boot/efi", "mount /boot/efi", set()),
    # a shim that is not the image's, a stub that finds no /boot: imgbase recover mends both
    ("esp", "echo junk > /boot/efi/EFI/BOOT/BOOTX64.EFI && "
     "echo 'search --label x' > /boot/efi/EFI/debian/grub.cfg", "imgbase recover", set()),
]


def test_installed_disk_boots_from_its_layer(node: Guest) -> None:
    host = node.host()
    assert host.check_output("systemctl is-system-running --wait") == "running"
    root = json.loads(host.check_output("findmnt -J -o SOURCE,FSTYPE,OPTIONS /"))
    fs = root["filesystems"][0]
    assert same_device(host, fs["source"], f"/dev/imgbase/{NVR}+1")
    assert fs["fstype"] == "ext4" and "discard" in fs["options"]
    var = json.loads(host.check_output("findmnt -J -o SOURCE /var"))["filesystems"][0]
    assert same_device(host, var["source"], "/dev/imgbase/var")
    lvs = {lv["lv_name"]: lv for lv in json.loads(host.check_output(
        "lvs --reportformat json -o lv_name,lv_attr,lv_tags,origin,pool_lv imgbase"
    ))["report"][0]["lv"]}
    base, layer = lvs[NVR], lvs[f"{NVR}+1"]
    assert base["lv_attr"][1] == "r" and base["lv_attr"][4] != "a" and base["lv_attr"][9] == "k"
    assert "imgbase:base" in base["lv_tags"] and base["pool_lv"] == "pool"
    assert layer["origin"] == NVR and "imgbase:layer" in layer["lv_tags"]
    assert layer["lv_attr"][1] == "w" and layer["lv_attr"][4] == "a"
    assert "imgbase:volume" in lvs["var"]["lv_tags"]
    # mkfs wrote the base's inode tables: no layer zeroes its own copy in the background
    # (ext4lazyinit), which would cost each layer ~128 MiB of pool
    for lv in (f"{NVR}+1", "var"):
        groups = host.check_output(f"dumpe2fs /dev/imgbase/{lv} 2>/dev/null | "
                                   "grep -c '^Group [0-9]'")
        zeroed = host.check_output(f"dumpe2fs /dev/imgbase/{lv} 2>/dev/null | "
                                   "grep -c '^Group [0-9].*ITABLE_ZEROED'")
        assert int(groups) > 1 and zeroed == groups, (lv, groups, zeroed)
    assert host.file("/var/lib/dpkg/status").exists  # package db reachable through /var
    assert host.check_output("imgbase --version").startswith("imgbase ")

    status = json.loads(host.check_output("imgbase status --json"))
    schema = json.loads((ROOT / "docs/status.schema.json").read_text())
    jsonschema.validate(status, schema)
    assert status["booted_layer"] == status["default_layer"] == f"{NVR}+1"
    assert status["bases"][0]["name"] == NVR and status["bases"][0]["read_only"] is True
    assert [(v["name"], v["mountpoint"]) for v in status["volumes"]] == [("var", "/var")]
    assert host.check_output("imgbase w") == f"{NVR}+1"
    # installed with --menu-timeout 0: GRUB booted the default without its countdown
    assert json.loads(host.check_output("imgbase boot --json"))["menu_timeout"] == 0
    assert "will be executed automatically" not in node.serial_tail(10_000)
    check = json.loads(host.check_output("imgbase check --json"))
    assert check["ok"] is True, [c for c in check["checks"] if not c["ok"]]
    assert {c["name"] for c in check["checks"]} >= {
        "vg", "pool", "bases", "layers", "pool-data", "pool-metadata", "autoextend", "var",
        "discard", "boot-entries", "booted", "incomplete"}


def test_node_passes_every_check(node: Guest) -> None:
    failed = {k: v for k, v in check(node).items() if not v["ok"]}
    assert not failed


def test_the_primary_nic_is_bridged_for_the_vms(node: Guest) -> None:
    """br0 holds the node's address over the NIC the installer used; libvirt's default
    network is that bridge, so a domain defined with the default interface is on the LAN."""
    net = status(node)["network"]
    [br0] = [b for b in net["bridges"] if b["name"] == "br0"]
    nic = next(i for i in net["interfaces"] if i["master"] == "br0")
    assert br0["addresses"] == ["10.0.2.15/24"] and br0["ports"] == [nic["name"]], net
    assert not nic["addresses"]  # the address moved to the bridge
    bridge_mac = next(i["mac"] for i in net["interfaces"] if i["name"] == "br0")
    assert bridge_mac == nic["mac"]  # DHCP reservations keep working
    assert node.run("virsh -q net-list --name").stdout.split() == ["default"]
    xml = node.run("virsh net-dumpxml default").stdout
    assert "<bridge name='br0'/>" in xml and "<forward mode='bridge'/>" in xml
    node.run("virsh -q define /dev/stdin <<'EOF'\n"
             "<domain type='qemu'><name>onlan</name><memory unit='MiB'>32</memory>"
             "<os><type arch='x86_64'>hvm</type></os>"
             "<devices><interface type='network'><source network='default'/></interface>"
             "</devices></domain>\nEOF")
    try:
        node.run("virsh -q start onlan")
        ports = json.loads(node.run("ip -j link show master br0").stdout)
        tap = [p["ifname"] for p in ports if p["ifname"] != nic["name"]]
        assert len(tap) == 1 and tap[0].startswith("vnet"), ports
    finally:
        node.run("virsh -q destroy onlan; virsh -q undefine onlan", check=False)


@pytest.mark.parametrize(("name", "breaks", "mends", "also"), BREAKS,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BREAKS)])
def test_each_check_can_fail(node: Guest, name: str, breaks: str, mends: str,
                             also: set[str]) -> None:
    node.run(breaks)
    try:
        results = check(node)
    finally:
        node.run(mends)
    failed = {k for k, v in results.items() if not v["ok"]}
    assert failed == {name} | also, results
    assert results[name]["detail"]
    if "vmlinuz" in breaks:
        assert f"boot entry {LAYER} has no kernel or initrd" in str(results[name]["detail"])
    if "garbage" in breaks:
        assert "not an entry" in str(results[name]["detail"])
        assert node.run("imgbase status --json", check=False).rc == 0
    # put back: the next test asserts its own check alone fails, the later ones that all pass


def test_check_refuses_a_bad_config(node: Guest) -> None:
    node.run("mkdir -p /etc/imgbase && echo '[check]\npool_data_max = 150' "
             "> /etc/imgbase/imgbase.toml")
    try:
        proc = node.run("imgbase check", check=False)
    finally:
        node.run("rm /etc/imgbase/imgbase.toml")
    assert proc.rc == 2 and "pool_data_max = 150 is not a percentage" in proc.stderr


def test_booted_layer_and_its_base_cannot_be_removed(node: Guest) -> None:
    for command, message in (
        (f"imgbase layer --remove {LAYER}", f"cannot remove {LAYER}: layer {LAYER} is booted"),
        (f"imgbase base --remove {NVR}", f"cannot remove base {NVR}: layer {LAYER} is booted"),
        ("imgbase layer --remove nope", "'nope' is not a layer name"),
        ("imgbase layer --remove nope-1-1+1", "nope-1-1+1 is not a layer of this node"),
        ("imgbase base --remove nope", "'nope' is not a name-version-release"),
    ):
        proc = node.run(command, check=False)
        assert proc.rc == 2 and message in proc.stderr, (command, proc.stderr)
    assert [la["name"] for la in json.loads(node.run("imgbase status --json").stdout)
            ["layers"]] == [LAYER]


def test_interrupted_layer_add_is_recovered(node: Guest) -> None:
    crashed = node.run("IMGBASE_CRASH_AFTER_STEP=layer-fstab imgbase layer --add", check=False)
    assert crashed.rc == 137
    status = json.loads(node.run("imgbase status --json").stdout)
    assert status["incomplete"] == [f"{NVR}+2"]
    results = check(node)
    assert not results["incomplete"]["ok"] and not results["boot-entries"]["ok"]
    dry = node.run("imgbase recover --dry-run").stdout
    assert "interrupted: layer-add, after step layer-fstab" in dry
    assert f"lvremove -y imgbase/{NVR}+2" in dry and "umount -l /run/imgbase/work/layer-add" in dry
    assert f"{NVR}+2" in node.run("lvs --noheadings -o lv_name imgbase").stdout  # dry: kept
    node.run("imgbase recover")
    status = json.loads(node.run("imgbase status --json").stdout)
    assert status["incomplete"] == [] and [la["name"] for la in status["layers"]] == [LAYER]
    assert all(v["ok"] for v in check(node).values())
    assert "no interrupted operation" in node.run("imgbase recover --dry-run").stdout


def test_health_marks_the_installed_layer_good(node: Guest) -> None:
    st = status(node)
    assert layer(st, A)["last_health"]["good"] is True, layer(st, A)
    assert node.run("systemctl is-active imgbase-health").stdout.strip() == "active"


def node_record(etcd: EtcdCluster, layer: str, timeout: float = 90) -> dict[str, Any]:
    """The node's record in etcd once it shows `layer` (None: until it is gone)."""
    t0 = time.monotonic()
    with etcd.client() as client:
        while time.monotonic() - t0 < timeout:
            records = fleet.nodes(client)
            found = [r for r in records.values() if r.get("layer") == layer]
            if found:
                return found[0]
            time.sleep(1)
    raise AssertionError(f"no node record for {layer} within {timeout:.0f} s: {records}")


def test_agent_joins_the_cluster_with_the_hosts_capabilities(node: Guest,
                                                             etcd: EtcdCluster) -> None:
    # no config: the unit's conditions skip the agent, nothing failed
    show = node.run("systemctl show -p ActiveState -p Result -p ConditionResult "
                    "imgbase-agent").stdout
    assert "ActiveState=inactive" in show and "ConditionResult=no" in show, show
    assert "Result=success" in show, show
    # a bad config: one clear line, exit 78, no restart loop -- and the node is fine
    node.run("mkdir -p /etc/imgbase && "
             "echo '[cluster]\nendpoints = [\"etcd:2379\"]' > /etc/imgbase/agent.toml")
    node.run("systemctl restart imgbase-agent", check=False)
    for _ in range(30):  # READY comes just before the exit: let the exit land
        show = node.run("systemctl show -p ExecMainStatus -p ActiveState imgbase-agent").stdout
        if "ActiveState=failed" in show:
            break
        time.sleep(1)
    assert "ExecMainStatus=78" in show and "ActiveState=failed" in show, show
    assert "endpoint 'etcd:2379' is not an http(s) URL" in node.run(
        "journalctl -b -u imgbase-agent").stdout
    node.run("printf '[cluster]\nendpoints = [\"http://10.0.2.100:2379\"]\ninsecure_http = true\n"
             "group = \"life\"\n[agent]\nttl = 15\n' > /etc/imgbase/agent.toml && "
             "systemctl restart imgbase-agent")
    record = node_record(etcd, A)
    caps = record["capabilities"]
    assert (record["nvr"], record["group"], record["healthy"]) == (NVR, "life", True)
    assert caps["arch"] == "x86_64" and caps["virt_types"] == ["tcg"], caps
    assert caps["accelerated"] is False and caps["running_domains"] == 0
    assert caps["libvirt_version"].startswith("9.") and caps["memory_mib"] > 1500
    assert caps["numa_cells"] >= 1 and caps["cpus"] == 2
    assert node.run("imgbase-agent registered").rc == 0
    assert node.run("systemctl is-active imgbase-agent").stdout.strip() == "active"


def test_the_menu_timeout_is_a_grubenv_setting(node: Guest) -> None:
    node.run("imgbase boot --menu-timeout 5")
    assert json.loads(node.run("imgbase boot --json").stdout)["menu_timeout"] == 5
    assert "imgbase_timeout=5" in node.run("grub-editenv /boot/grub/grubenv list").stdout
    bad = node.run("imgbase boot --menu-timeout 900", check=False)
    assert bad.rc == 2 and "menu timeout 900 is out of range" in bad.stderr
    node.run("imgbase boot --menu-timeout 0")  # as installed: the rest boots without a wait
    assert "imgbase_timeout=0" in node.run("grub-editenv /boot/grub/grubenv list").stdout


def test_kargs_are_checked_and_carried_to_a_new_layer(node: Guest) -> None:
    before = node.run("cat /boot/grub/imgbase-entries.cfg").stdout
    for bad, message in (("--append \"a'b\"", "cannot go into a boot entry"),
                         ("--append 'x;reboot'", "cannot go into a boot entry"),
                         ("--append root=/dev/sda1", "root= is set by imgbase"),
                         ("--delete nothere=1", "is not set")):
        proc = node.run(f"imgbase kargs {bad}", check=False)
        assert proc.rc == 2 and message in proc.stderr, (bad, proc.stderr)
    assert node.run("cat /boot/grub/imgbase-entries.cfg").stdout == before
    node.run("imgbase kargs --append imgbase.test=carried")
    assert "imgbase.test=carried" in json.loads(node.run("imgbase kargs --json").stdout)
    node.run("imgbase layer --add")
    assert "imgbase.test=carried" in layer(status(node), B)["kargs"]


def test_with_boot_unmounted_or_a_broken_menu_nothing_is_removed_or_written(node: Guest
                                                                             ) -> None:
    """Issue 18: after layer --add and boot --set-default of the new layer, `umount /boot;
    imgbase recover --dry-run` planned the lvremove of the default layer."""
    try:
        node.run(f"imgbase boot --set-default {B}")
        env = node.run("grub-editenv /boot/grub/grubenv list").stdout
        assert f"saved_entry={B}" in env
        node.run("umount /boot/efi /boot")  # the ESP is mounted on /boot
        try:
            root_boot = node.run("find /boot -xdev -printf '%p %s %T@\\n' | sort").stdout
            for command in ("imgbase recover --dry-run", "imgbase gc --dry-run", "imgbase recover",
                            f"imgbase boot --set-default {A} --no-trial", "imgbase layer --add",
                            "imgbase kargs --append imgbase.test=x", f"imgbase boot --next {A}"):
                proc = node.run(command, check=False)
                assert proc.rc == 2 and "/boot is not mounted" in proc.stderr, (command, proc)
                assert "lvremove" not in proc.stdout
            # nothing went into the root's own /boot, which GRUB never reads
            assert node.run("find /boot -xdev -printf '%p %s %T@\\n' | sort").stdout == root_boot
        finally:
            node.run("mount /boot && mount /boot/efi")
        assert node.run("grub-editenv /boot/grub/grubenv list").stdout == env
        node.run(f"cp {ENTRIES} /root/entries.cfg && echo 'menuentry broken {{' >> {ENTRIES}")
        try:
            proc = node.run("imgbase recover --dry-run", check=False)
            assert proc.rc == 2 and "cannot read the boot menu" in proc.stderr, proc
        finally:
            node.run(f"cp /root/entries.cfg {ENTRIES}")
        assert "lvremove" not in node.run("imgbase recover --dry-run").stdout
        assert [la["name"] for la in status(node)["layers"]] == [A, B]
    finally:  # as the next test expects, whatever failed above
        node.run("mountpoint -q /boot || mount /boot")
        node.run("mountpoint -q /boot/efi || mount /boot/efi")
        node.run(f"imgbase boot --set-default {A} --no-trial")


def check_ok(guest: Guest) -> None:
    report = json.loads(guest.run("imgbase check --json", check=False).stdout)
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]


def test_added_layer_boots_once_by_next_boot_then_the_default_again(
        node: Guest, etcd: EtcdCluster) -> None:
    st = status(node)
    assert [(la["name"], la["boot_entry"]) for la in st["layers"]] == [(A, True), (B, True)]
    check_ok(node)
    uuids = {node.run(f"blkid -s UUID -o value /dev/imgbase/{name}").stdout for name in (A, B)}
    assert len(uuids) == 2  # the new layer has its own filesystem UUID
    node.run("touch /etc/only-in-the-old-layer && echo kept > /var/lib/shared-var")
    # B is a fresh layer of the base: it gets the agent's config the way a site would
    node.run(f"mount /dev/imgbase/{B} /mnt && install -D -m 644 /etc/imgbase/agent.toml "
             "/mnt/etc/imgbase/agent.toml && umount /mnt")
    node.run(f"imgbase boot --next {B}")
    st = status(node)
    assert st["next_boot_layer"] == B and st["default_layer"] == A
    resets = node.resets
    node.reboot()
    assert node.resets == resets + 1  # the guest's reset ended qemu; a fresh one booted it
    up = time.monotonic()
    assert node.run("imgbase w").stdout.strip() == B
    node_record(etcd, B, timeout=60)  # the agent joined again, from the new layer
    print(f"registered {time.monotonic() - up:.0f} s after SSH answered")
    assert "imgbase.test=carried" in node.run("cat /proc/cmdline").stdout.split()
    assert node.run("cat /var/lib/shared-var").stdout.strip() == "kept"  # /var is shared
    assert node.run("test -e /etc/only-in-the-old-layer", check=False).rc == 1
    assert status(node)["next_boot_layer"] is None
    check_ok(node)
    node.reboot()
    assert node.run("imgbase w").stdout.strip() == A


def test_an_unhealthy_layer_is_abandoned(node: Guest) -> None:
    node.run(f"mount /dev/imgbase/{B} /mnt && mkdir -p /mnt/etc/imgbase/health.d/required && "
             "printf '#!/bin/sh\\necho the test says no\\nexit 1\\n' "
             "> /mnt/etc/imgbase/health.d/required/says-no && "
             "chmod +x /mnt/etc/imgbase/health.d/required/says-no && umount /mnt")
    node.run(f"imgbase boot --set-default {B} --tries 1")
    st = status(node)
    assert (st["default_layer"], st["fallback_layer"], layer(st, B)["tries_left"]) == (B, A, 1)
    boots = boots_in_serial_log(node)
    node.run("systemd-run --on-active=1 --no-block systemctl reboot")
    time.sleep(10)
    wait_back_on(node, A)
    assert boots_in_serial_log(node) - boots == 2  # N + 1 boots
    st = status(node)
    assert st["default_layer"] == A
    assert [a["layer"] for a in st["abandoned"]] == [B]
    assert "the test says no" in st["abandoned"][0]["reason"]
    assert layer(st, B)["last_health"]["good"] is False


# a signed kernel made unsigned: the PE security directory cleared, the certificates cut off
UNSIGN = """import struct, sys
path = sys.argv[1]
data = bytearray(open(path, "rb").read())
pe = struct.unpack_from("<I", data, 0x3c)[0]
dirs = pe + 24 + (112 if struct.unpack_from("<H", data, pe + 24)[0] == 0x20b else 96)
offset, size = struct.unpack_from("<II", data, dirs + 4 * 8)
assert offset and size, "the kernel is not signed"
struct.pack_into("<II", data, dirs + 4 * 8, 0, 0)
open(path, "wb").write(data[:offset])
"""


def test_under_secure_boot_an_unsigned_kernel_falls_back(node: Guest) -> None:
    """GRUB (through shim) refuses a layer whose kernel lost its signature; the node boots
    its fallback by itself and abandons the layer."""
    assert node.run("mokutil --sb-state").stdout.strip() == "SecureBoot enabled"
    node.run(f"python3 - /boot/{B}/vmlinuz <<'EOF'\n{UNSIGN}EOF")
    node.run(f"imgbase boot --set-default {B} --tries 1")
    log_at = len(node.serial_log.read_bytes())
    node.run("systemd-run --on-active=1 --no-block systemctl reboot")
    time.sleep(10)
    wait_back_on(node, A)
    since = node.serial_log.read_bytes()[log_at:].decode(errors="replace")
    assert "bad shim signature" in since
    assert since.count("Linux version ") == 1  # B's kernel never ran; A booted
    st = status(node)
    assert st["default_layer"] == A and st["abandoned"][-1]["layer"] == B


def test_a_full_boot_is_refused_before_anything_changes(node: Guest) -> None:
    state = ("lvs --noheadings -o lv_name,lv_tags imgbase; cat /boot/grub/imgbase-entries.cfg "
             "/boot/grub/grubenv; ls /boot")
    before = node.run(state).stdout
    node.run("fallocate -l $(( $(df --output=avail -B1 /boot | tail -1) - (4 << 20) )) "
             "/boot/filler")
    try:
        proc = node.run("imgbase layer --add", check=False)
    finally:
        node.run("rm /boot/filler")
    assert proc.rc == 2 and "/boot is too full for another layer" in proc.stderr, proc.stderr
    assert "MiB free" in proc.stderr and "MiB needed" in proc.stderr
    assert node.run(state).stdout == before


def test_update_refusals_change_nothing(node: Guest) -> None:
    """No signature, no trusted key, not a squashfs, no image, a bad checksum, --insecure
    where imgbase.toml does not allow it, an image older than the newest the node has
    accepted; base --add of an unsigned image: each is refused with one line, and status
    --json is exactly as before."""
    image = f"{MEDIA}/{V2}.squashfs"
    mount_media(node)  # again: the node has rebooted since
    node.run(f"mkdir -p /var/tmp/u && ln -sf {image} /var/tmp/u/v2.squashfs && "
             f"cp {image}.sha256 /var/tmp/u/v2.squashfs.sha256 && "
             "head -c 8M /dev/urandom > /var/tmp/u/junk.squashfs")
    before = without_usage(status(node))
    # the install recorded v1 as accepted, and tagged its base with the signing key
    assert json.loads(node.run("cat /var/lib/imgbase/accepted.json").stdout) == {
        "imgbase-node": NVR}
    assert before["bases"][0]["signed_by"] is not None
    cases = [("update /var/tmp/u/v2.squashfs", "is not signed"),
             ("base --add /var/tmp/u/v2.squashfs", "is not signed"),
             ("update /var/tmp/u/junk.squashfs", "junk.squashfs.sha256 is missing"),
             ("update --insecure /var/tmp/u/v2.squashfs",
              "--insecure is not allowed on this node"),
             ("update /var/tmp/u/nothere.squashfs", "no such image")]
    for args, message in cases:
        proc = node.run(f"imgbase {args}", check=False)
        assert proc.rc == 2 and message in proc.stderr, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1, proc.stderr
    node.run(f"cp {image}.sha256.sig /var/tmp/u/v2.squashfs.sha256.sig")
    untrusted = node.run("imgbase update /var/tmp/u/v2.squashfs", check=False)
    assert untrusted.rc == 2 and "no trusted keys in /etc/imgbase/trusted.d" in untrusted.stderr
    # --insecure (allowed here) accepts a missing signature, never a checksum that does
    # not match
    node.run("printf '[trust]\\nallow_insecure = true\\n' > /etc/imgbase/imgbase.toml")
    node.run(f"rm /var/tmp/u/v2.squashfs.sha256.sig && echo {'0' * 64} "
             "> /var/tmp/u/v2.squashfs.sha256")
    try:
        corrupt = node.run("imgbase update --insecure /var/tmp/u/v2.squashfs", check=False)
    finally:
        node.run("rm /etc/imgbase/imgbase.toml")
    assert corrupt.rc == 65 and "does not match" in corrupt.stderr, corrupt.stderr
    node.run(f"rm -r /var/tmp/u && install -D -m 644 {MEDIA}/trusted.gpg "
             "/etc/imgbase/trusted.d/test.gpg")
    # anti-rollback: the record, not the bases present, says what is too old
    node.run("cp /var/lib/imgbase/accepted.json /var/tmp/accepted.json && "
             "echo '{\"imgbase-node\": \"imgbase-node-9.0-1\"}' > /var/lib/imgbase/accepted.json")
    try:
        old = node.run(f"imgbase update {image}", check=False)
    finally:
        node.run("mv /var/tmp/accepted.json /var/lib/imgbase/accepted.json")
    assert old.rc == 65 and "the newest image this node has accepted" in old.stderr, old.stderr
    assert node.run("ls -A /var/lib/imgbase/images").stdout == ""  # no copy left
    assert without_usage(status(node)) == before


def test_update_carries_the_node_over(node: Guest) -> None:
    """Through the CLI (the agent's way, rollback and roll-forward: tests/e2e)."""
    image = f"{MEDIA}/{V2}.squashfs"
    node.run("echo 'local edit' >> /etc/motd && useradd -u 1234 alice && "
             "systemctl disable imgbase-selfcheck.service")
    check = json.loads(node.run(f"imgbase update {image} --check --json").stdout)
    assert check["signature"].startswith("signed by ") and check["delta_from"] == NVR
    dry = node.run(f"imgbase update {image} --dry-run").stdout
    assert "base-snapshot" in dry and f"imgbase/{NVR}" in dry  # a delta of v1's base
    out = node.run(f"imgbase update {image} --json", timeout=1200).stdout
    sync = [json.loads(e) for e in out.splitlines() if '"base-sync"' in e]
    assert "delta: " in json.dumps(sync)  # from the file listings, not a whole-tree walk
    # the delta base is its image, byte for byte (contents, modes, owners, xattrs, links)
    proof = json.loads(node.run(f"imgbase verify {V2} {image} --json", timeout=900).stdout)
    assert proof == {"base": V2, "matches": True, "differing": []}
    st = status(node)
    assert [b["name"] for b in st["bases"]] == [NVR, V2]
    assert st["bases"][1]["signed_by"] == check["signature"].removeprefix("signed by ")
    assert json.loads(node.run("cat /var/lib/imgbase/accepted.json").stdout) == {
        "imgbase-node": V2}
    assert (st["default_layer"], st["fallback_layer"]) == (f"{V2}+1", A)
    assert layer(st, f"{V2}+1")["tries_left"] == 3
    assert "imgbase.test=carried" in layer(st, f"{V2}+1")["kargs"]
    again = node.run(f"imgbase update {image}", check=False)
    assert again.rc == 77 and "already on this node" in again.stderr
    # no reboot here: v3 (next) is installed over this pending v2, and the node boots
    # that; a reboot onto an update and the rollback after it are in tests/e2e


def test_update_package_then_gc_keeps_two_images(node: Guest) -> None:
    """v1 -> v3 through the update package (v2 still pending, never booted); the node
    boots v3 with its state carried over, and gc keeps the two images found healthy."""
    deb = f"{MEDIA}/imgbase-node-image-update_1.2-1_amd64.deb"
    mount_media(node)
    out = node.run(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q {deb}", timeout=1200)
    assert f"updated: {V3} boots next" in out.stdout, out.stdout[-2000:]
    st = status(node)
    assert [b["name"] for b in st["bases"]] == [NVR, V2, V3]
    assert (st["default_layer"], st["fallback_layer"]) == (f"{V3}+1", A)
    node.reboot()
    assert node.run("imgbase w").stdout.strip() == f"{V3}+1"
    mount_media(node)
    # carried over from v1's layer: an /etc edit, a user, a disabled service, kargs
    assert "local edit" in node.run("cat /etc/motd").stdout
    assert node.run("id -u alice").stdout.strip() == "1234"
    assert node.run("cat /etc/imgbase-image-version").stdout.strip() == V3  # the image's
    assert node.run("systemctl is-enabled imgbase-selfcheck.service",
                    check=False).stdout.strip() == "disabled"
    assert "imgbase.test=carried" in node.run("cat /proc/cmdline").stdout.split()
    st = status(node)
    assert [b["addresses"] for b in st["network"]["bridges"]] == [["10.0.2.15/24"]]  # br0
    assert st["fallback_layer"] is None and layer(st, f"{V3}+1")["last_health"]["good"]
    # kept: v3 and v1, the images last found healthy; v2 never booted and is collected
    assert [b["name"] for b in st["bases"]] == [NVR, V3]
    assert not [la for la in st["layers"] if la["name"].startswith(f"{V2}+")]
    history = json.loads(node.run("cat /var/lib/imgbase/health.json").stdout)
    assert [h["removed"] for h in history if h.get("event") == "gc"][-1] == [V2]
    assert node.run(f"test -e /boot/{V2}+1", check=False).rc == 1
    check_ok(node)


RESCUE_STATUS = "/var/lib/imgbase-test-rescue-status.json"


def rescue_shell(node: Guest) -> str:
    """Boot the booted base's rescue entry once (`imgbase boot --rescue`), under Secure
    Boot: at its root shell on the console (no password: root's is locked, the entry
    forces), check / is the base under the tmpfs overlay with the node's /boot and /var,
    keep `imgbase status --json` in the node's /var (RESCUE_STATUS: a 5 KB line is not
    for a serial console), then `systemctl reboot` to the default. The base."""
    node.run(f"imgbase boot --rescue && rm -f {RESCUE_STATUS}")
    base: str = status(node)["next_boot_rescue"]
    log_at = len(node.serial_log.read_bytes())
    node.run("systemd-run --on-active=1 --no-block systemctl reboot")
    node.wait_console(r"Press Enter for maintenance", since=log_at, timeout=600)
    node.console_send("\r")
    node.wait_console(r"\n[^\n]*# ", since=log_at, timeout=60)
    node.console_send("echo RESCUE-$((1+1))-BEGIN; { mokutil --sb-state; findmnt -n -o "
                      "FSTYPE /; findmnt -n -o OPTIONS / | tr , '\\n' | grep ^lowerdir; "
                      "findmnt -n -o TARGET /boot; findmnt -n -o TARGET /var; "
                      f"imgbase status --json > {RESCUE_STATUS}; echo status=$?; }} 2>&1; "
                      "echo RESCUE-$((1+1))-END\r")
    out = node.wait_console(r"(?s)RESCUE-2-BEGIN\r?\n(.*?)RESCUE-2-END", since=log_at,
                            timeout=120).group(1).splitlines()
    assert [line.strip() for line in out] == [
        "SecureBoot enabled", "overlay", "lowerdir=/run/imgbase/live/lower", "/boot", "/var",
        "status=0"], out
    node.console_send("systemctl reboot\r")
    return base


def test_reset_boots_a_fresh_layer_healthy_with_the_nodes_identity(
        node: Guest, etcd: EtcdCluster) -> None:
    """A root broken three ways (an fstab line that would stop the boot, an /etc edit, a
    file of /usr gone): `imgbase reset` gives a fresh layer of the same base that boots
    healthy, is still this node (machine-id, SSH host key, network, cluster join), and
    /var is as it was. Between the two, the base's rescue entry boots once (Secure Boot,
    a root shell on the console)."""
    old = status(node)["booted_layer"]
    new = f"{old.rsplit('+', 1)[0]}+2"
    identity = "cat /etc/machine-id /etc/ssh/ssh_host_ed25519_key.pub /etc/imgbase/agent.toml"
    before = node.run(identity).stdout
    node.run("echo '/dev/imgbase/nonexistent /srv ext4 defaults 0 2' >> /etc/fstab && "
             "echo broken >> /etc/motd && rm /usr/bin/less && "
             "echo kept > /var/lib/reset-marker")
    plan = json.loads(node.run("imgbase reset --dry-run --json").stdout)
    assert plan["operation"] == "reset" and "carry" in [s["name"] for s in plan["steps"]]
    node.run("imgbase reset")
    st = status(node)
    assert (st["default_layer"], st["fallback_layer"]) == (new, old)
    assert [(b["name"], b["rescue_entry"]) for b in st["bases"]] == [(NVR, True), (V3, True)]
    # on the way, the base's rescue entry, once: it reads the node's menu and records, and
    # GRUB's one-time boot leaves the trial's count as it was
    base = rescue_shell(node)
    wait_back_on(node, new)  # healthy: the trial ended, no fallback left
    assert status(node)["rescue_boot"] is None
    # what status said in the rescue system, kept in the node's /var
    rescued = json.loads(node.run(f"cat {RESCUE_STATUS}").stdout)
    assert base == old.rsplit("+", 1)[0] and rescued["rescue_boot"] == base
    assert rescued["booted_layer"] is None and rescued["next_boot_rescue"] is None
    assert (rescued["default_layer"], rescued["fallback_layer"]) == (new, old)
    assert layer(rescued, new)["tries_left"] == layer(st, new)["tries_left"] == 3
    assert node.run("systemctl is-system-running --wait", check=False).stdout.strip() == \
        "running"
    assert node.run(identity).stdout == before
    assert "/srv" not in node.run("cat /etc/fstab").stdout
    assert "broken" not in node.run("cat /etc/motd").stdout
    assert node.run("test -x /usr/bin/less", check=False).rc == 0
    assert node.run("cat /var/lib/reset-marker").stdout.strip() == "kept"
    assert [b["addresses"] for b in status(node)["network"]["bridges"]] == [["10.0.2.15/24"]]
    node_record(etcd, new, timeout=90)  # the same node, joined again from the new layer
    check_ok(node)
    assert old in [la["name"] for la in status(node)["layers"]]  # kept until gc


def test_a_node_that_loses_power_leaves_the_cluster_when_its_lease_expires(
        node: Guest, etcd: EtcdCluster) -> None:
    record = node_record(etcd, status(node)["booted_layer"])  # V3's reset layer, by now
    node.kill()  # the power goes: no goodbye from the agent
    t0 = time.monotonic()
    with etcd.client() as client:
        while fleet.nodes(client) and time.monotonic() - t0 < 60:
            time.sleep(1)
        assert fleet.nodes(client) == {}, record
    assert time.monotonic() - t0 >= 3  # the lease (15 s) ran out; nothing revoked it
