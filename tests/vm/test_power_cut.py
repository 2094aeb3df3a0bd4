"""Power-cut campaign: `imgbase update` cut off by a power loss at every step boundary and
in the middle of its long steps; after each, the node boots by itself, `imgbase recover`
and `imgbase check` pass, and the node runs the old layer -- or, once only the switch
of the default was left, goes on to the new one.

The cut is real: IMGBASE_POWER_CUT makes the update reset the guest through
/proc/sysrq-trigger -- no sync, no unmount, no shutdown, so whatever was not yet on disk
is lost -- and the guest boots again from its disk through GRUB.

About 21 cuts, ~95 s each under TCG (~35 min): `make test-powercut` (marker `powercut`),
apart from `make test`. Two more rows fill a disk during an update -- /boot (fallocate), and
the thin pool (the VG's free space taken, then a thin LV written until the pool is full; the
pool queues writes for 60 s, then fails them) -- and check that the update fails in one line,
journaled, with no temporary file; the node boots the old layer; recover cleans up.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgbase.vm import Guest
from tests.vm.nodes import MEDIA, NVR, V2, module_node, mount_media

pytestmark = [pytest.mark.slow, pytest.mark.vm, pytest.mark.powercut]

A, NEW = f"{NVR}+1", f"{V2}+1"
IMAGE = f"{MEDIA}/{V2}.squashfs"
# cuts in the middle of a step, seconds after it starts: base-sync while it mounts and
# while rsync writes, the /etc merge, fsck, and the copy of kernel and initrd to /boot
DURING = [("base-sync", 0.3), ("base-sync", 1.5), ("etc-merge", 0.5), ("layer-fsck", 0.5),
          ("boot-files", 0.2)]


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest, installed_disks: dict[str, Path], media: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    for guest in module_node(request, installed_disks["minimal"],
                             tmp_path_factory.mktemp("power") / "run", attach=(media,)):
        mount_media(guest)
        guest.run(f"install -D -m 644 {MEDIA}/trusted.gpg /etc/imgbase/trusted.d/test.gpg")
        yield guest


def status(guest: Guest) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(guest.run("imgbase status --json").stdout)
    return result


def update_steps(guest: Guest) -> list[str]:
    plan = json.loads(guest.run(f"imgbase update {IMAGE} --dry-run --json").stdout)
    return [s["name"] for s in plan["steps"]]


def cut(guest: Guest, point: str) -> None:
    """Start the update with the power cut armed, and wait for the boot after the cut."""
    old = guest.boot_id()
    guest.run(f"IMGBASE_POWER_CUT={point} nohup imgbase update {IMAGE} "
              "> /root/update.log 2>&1 < /dev/null &")
    guest.wait_new_boot(old)
    mount_media(guest)


def recover_and_check(guest: Guest) -> dict[str, Any]:
    guest.run("systemctl is-system-running --wait", check=False, timeout=300)
    guest.run("imgbase recover")
    report = json.loads(guest.run("imgbase check --json", check=False).stdout)
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    st = status(guest)
    assert st["incomplete"] == [], st
    return st


def back_to_v1_only(guest: Guest) -> None:
    """Undo a finished update, so the next cut starts from the same node."""
    if status(guest)["default_layer"] != A:
        guest.run(f"imgbase boot --set-default {A} --no-trial")
    if guest.run("imgbase w").stdout.strip() != A:
        guest.reboot()
        mount_media(guest)
    if any(la["name"] == NEW for la in status(guest)["layers"]):
        guest.run(f"imgbase layer --remove {NEW}")
    if any(b["name"] == V2 for b in status(guest)["bases"]):
        guest.run(f"imgbase base --remove {V2}")


def test_power_cuts_through_an_update_leave_a_node_that_boots_and_recovers(
        node: Guest) -> None:
    steps = update_steps(node)
    assert steps[-2:] == ["boot-default", "boot-commit"] and len(steps) >= 16
    # (the ESP's steps change nothing here, v2's shim and grub being v1's: they are cut
    # where they write, in test_power_cut_esp)
    points = [f"after:{s}" for s in steps[:-1] if not s.startswith("esp-")]
    points += [f"during:{s}:{t}" for s, t in DURING if s in steps]
    points.append(f"after:{steps[-1]}")  # last: the node then boots the new layer
    assert len(points) >= 20
    switched = steps.index("boot-default")
    outcomes = []
    for point in points:
        cut(node, point)
        booted = node.run("imgbase w").stdout.strip()
        st = recover_and_check(node)
        outcomes.append((point, booted, st["default_layer"]))
        at = steps.index(point.split(":")[1])
        if point == f"after:{steps[-1]}":
            assert booted == NEW, outcomes  # committed: GRUB saw the new default
            new = next(la for la in st["layers"] if la["name"] == NEW)
            assert new["last_health"]["good"] is True, new
            continue
        if point.startswith("after:") and at >= switched:
            # grubenv written, /boot not yet committed: GRUB may read either
            assert booted in (A, NEW), outcomes
        else:
            assert booted == A, outcomes  # the default never moved before that step
        if point.startswith("after:") and at >= steps.index("layer-complete"):
            # complete: recover finished the update (or it was), the new layer is next
            assert st["default_layer"] == NEW, outcomes
        else:  # recover undid it
            assert st["default_layer"] == A and st["fallback_layer"] is None, outcomes
            assert [b["name"] for b in st["bases"]] == [NVR], outcomes
        back_to_v1_only(node)
    print("\n".join(f"{p:32} booted {b}, default after recover {d}" for p, b, d in outcomes))


# -- a disk that fills up during an update -------------------------------------------------

JOURNAL = "/var/lib/imgbase/journal.jsonl"
# /boot filled to its last 8 MiB, as root sees it: what any user may take (fallocate),
# then root's reserved blocks (written until ext4 says ENOSPC: it also holds back clusters
# for its metadata, up to 16 MiB, so no fixed margin below the free count fits), less 8 MiB.
# The image's kernel (14 MiB) and initrd (17 MiB) no longer fit. All of it in /boot/filler/.
FILL_BOOT = ("mkdir -p /boot/filler && fallocate -l $(( $(stat -f -c '%a*%S' /boot) )) "
             "/boot/filler/a && { dd if=/dev/zero of=/boot/filler/b bs=1M status=none "
             "2>/dev/null; truncate -s -8M /boot/filler/b; }")


def update_filling(guest: Guest, step: str, fill: str) -> tuple[int, str]:
    """Run the update; once its journal shows `step` started (its checks all passed), stop
    its processes, run `fill`, and let them go on. The update's exit status and output."""
    guest.run(f"rm -f /root/update.log; setsid imgbase update {IMAGE} > /root/update.log "
              "2>&1 < /dev/null & u=$!; "
              f"until grep -qs '\"step\": \"{step}\"' {JOURNAL}; do "
              "kill -0 $u 2>/dev/null || break; sleep 0.1; done; "
              f"kill -STOP -- -$u; {fill}; kill -CONT -- -$u; wait $u; echo $? > /root/update.rc",
              timeout=1800)
    rc = int(guest.run("cat /root/update.rc").stdout)
    return rc, guest.run("cat /root/update.log").stdout


def assert_failed_cleanly(guest: Guest, rc: int, log: str, step: str, reason: str) -> None:
    """One error line and a hint, no traceback, the failure journaled, no temporary file."""
    errors = [line for line in log.splitlines() if line.startswith("imgbase: error:")]
    assert rc == 1 and "Traceback" not in log, log
    assert len(errors) == 1 and f"step {step!r} failed" in errors[0], log
    assert reason in errors[0] and "(hint: " in errors[0], log
    last = json.loads(guest.run(f"tail -n 1 {JOURNAL}").stdout)
    assert last["event"] == "failed" and last["step"] == step and reason in last["error"], last
    assert guest.run("find /boot /var/lib/imgbase /etc -xdev -name '*.imgbase-tmp'").stdout == ""


def assert_recovered(guest: Guest) -> None:
    """After the boot: the old layer runs; recover leaves no incomplete LV, no new layer or
    base, no /boot files of the new layer, no temporary file, and no journal."""
    booted = guest.run("imgbase w").stdout.strip()
    assert booted == A, booted
    guest.run("systemctl is-system-running --wait", check=False, timeout=300)
    guest.run("imgbase recover")
    st = status(guest)
    assert st["incomplete"] == [] and st["default_layer"] == A, st
    assert [la["name"] for la in st["layers"]] == [A], st
    assert [b["name"] for b in st["bases"]] == [NVR], st
    assert guest.run(f"test ! -e /boot/{NEW} && test ! -e {JOURNAL} && "
                     "find /boot /var/lib/imgbase /etc -xdev -name '*.imgbase-tmp'"
                     ).stdout == ""


def test_a_full_boot_fails_the_update_cleanly_and_recover_cleans_up(node: Guest) -> None:
    back_to_v1_only(node)
    node.run("rm -rf /boot/filler")
    node.run(FILL_BOOT)  # full before: refused by the space check, nothing written
    refused = node.run(f"imgbase update {IMAGE}", check=False)
    assert refused.rc == 2 and "/boot is too full" in refused.stderr, refused
    assert node.run(f"test ! -e {JOURNAL} && lvs --noheadings -o lv_name | "
                    f"grep -c '{V2}' || true").stdout.strip() == "0"
    node.run("rm -r /boot/filler")
    # full during: the copy of kernel and initrd runs out of space
    rc, log = update_filling(node, "base-sync", FILL_BOOT)
    assert_failed_cleanly(node, rc, log, "boot-files", "No space left on device")
    node.reboot()  # /boot still full
    mount_media(node)
    assert_recovered(node)
    node.run("rm -r /boot/filler")
    recover_and_check(node)


def test_a_full_pool_fails_the_update_cleanly_and_recover_cleans_up(node: Guest) -> None:
    node.run("rm -rf /boot/filler")  # whatever the /boot row left
    back_to_v1_only(node)
    st = status(node)
    vg, pool = st["vg"], st["pool"]
    # the VG's free space taken first, so that the pool cannot autoextend; then, once the
    # update writes its base, a thin LV written until the pool has no block left (with the
    # pool's default queue_if_no_space, writes wait 60 s and then fail)
    node.run(f"lvcreate -y -l 100%FREE -n fill-vg {vg}")
    fill = (f"lvcreate -y -V {pool['size']}b -T {vg}/{pool['name']} -n fill-pool && "
            f"(dd if=/dev/zero of=/dev/{vg}/fill-pool bs=4M oflag=direct 2>/root/dd.log; "
            "true)")
    rc, log = update_filling(node, "base-sync", fill)
    assert status(node)["pool"]["data_percent"] >= 99.9, status(node)["pool"]
    assert_failed_cleanly(node, rc, log, "base-sync", "")
    node.run(f"lvremove -y {vg}/fill-pool {vg}/fill-vg")
    node.reboot()
    mount_media(node)
    assert_recovered(node)
    recover_and_check(node)
