"""A/B boot on an installed node: next boot once, kernel arguments carried to a new layer,
and layers that do not come up healthy -- or do not come up at all -- abandoned by the node
itself through GRUB's boot counter. The guest boots from its own disk throughout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgbase.vm import Guest
from tests.vm.nodes import NVR, module_node

pytestmark = [pytest.mark.slow, pytest.mark.vm]

A, B, C = f"{NVR}+1", f"{NVR}+2", f"{NVR}+3"


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest, installed_disks: dict[str, Path],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    yield from module_node(request, installed_disks["minimal"],
                           tmp_path_factory.mktemp("ab") / "run")


def status(guest: Guest) -> dict[str, Any]:
    guest.run("systemctl is-system-running --wait", check=False)  # health has run
    result: dict[str, Any] = json.loads(guest.run("imgbase status --json").stdout)
    return result


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


def test_health_marks_the_installed_layer_good(node: Guest) -> None:
    st = status(node)
    assert layer(st, A)["last_health"]["good"] is True, layer(st, A)
    assert node.run("systemctl is-active imgbase-health").stdout.strip() == "active"


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


def test_next_boot_once_then_the_default_again(node: Guest) -> None:
    node.run(f"imgbase boot --next {B}")
    st = status(node)
    assert st["next_boot_layer"] == B and st["default_layer"] == A
    node.reboot()
    assert node.run("imgbase w").stdout.strip() == B
    assert "imgbase.test=carried" in node.run("cat /proc/cmdline").stdout.split()
    assert status(node)["next_boot_layer"] is None
    node.reboot()
    assert node.run("imgbase w").stdout.strip() == A


def test_an_unhealthy_layer_is_abandoned(node: Guest) -> None:
    node.run(f"mount /dev/imgbase/{B} /mnt && mkdir -p /mnt/etc/imgbase/health.d/required && "
             "printf '#!/bin/sh\\necho the test says no\\nexit 1\\n' "
             "> /mnt/etc/imgbase/health.d/required/says-no && "
             "chmod +x /mnt/etc/imgbase/health.d/required/says-no && umount /mnt")
    node.run(f"imgbase boot --set-default {B} --tries 2")
    st = status(node)
    assert (st["default_layer"], st["fallback_layer"], layer(st, B)["tries_left"]) == (B, A, 2)
    boots = boots_in_serial_log(node)
    node.run("systemd-run --on-active=1 --no-block systemctl reboot")
    time.sleep(10)
    wait_back_on(node, A)
    assert boots_in_serial_log(node) - boots <= 3  # N + 1 boots
    st = status(node)
    assert st["default_layer"] == A
    assert [a["layer"] for a in st["abandoned"]] == [B]
    assert "the test says no" in st["abandoned"][0]["reason"]
    assert layer(st, B)["last_health"]["good"] is False


def test_a_layer_that_cannot_boot_is_abandoned(node: Guest) -> None:
    node.run("imgbase layer --add")
    node.run(f"head -c 4096 /dev/urandom > /boot/{C}/initrd.img")
    node.run(f"imgbase boot --set-default {C} --tries 1")
    boots = boots_in_serial_log(node)
    node.run("systemd-run --on-active=1 --no-block systemctl reboot")
    time.sleep(10)
    wait_back_on(node, A)
    assert boots_in_serial_log(node) - boots <= 2
    st = status(node)
    assert [a["layer"] for a in st["abandoned"]] == [B, C]
    assert "did not come up" in st["abandoned"][1]["reason"]
    assert node.run("imgbase check --json", check=False).rc == 0


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
