"""Power-cut campaign: `imgbase update` cut off by a power loss at every step boundary and
in the middle of its long steps; after each, the node boots by itself, `imgbase recover`
and `imgbase check` pass, and the node runs the old layer -- or, once only the switch
of the default was left, goes on to the new one.

The cut is real: IMGBASE_POWER_CUT makes the update reset the guest through
/proc/sysrq-trigger -- no sync, no unmount, no shutdown, so whatever was not yet on disk
is lost -- and the guest boots again from its disk through GRUB.

About 21 cuts, ~95 s each under TCG (~35 min): `make test-powercut` (marker `powercut`),
apart from `make test`.
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
    points = [f"after:{s}" for s in steps[:-1]]
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
