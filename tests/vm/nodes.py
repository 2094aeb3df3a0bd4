"""Helpers shared by the tests of installed nodes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgbase.vm import Guest, VmSpec

NVR = "imgbase-node-1.0-1"
V2, V3 = "imgbase-node-1.1-1", "imgbase-node-1.2-1"  # derived: see the media fixture
MEDIA = "/mnt/media"  # where node guests mount the media disk (vdb)


def same_device(host: Any, a: str, b: str) -> bool:
    """/dev/VG/LV and /dev/mapper/VG-LV name the same device-mapper node."""
    real_a, real_b = (host.check_output(f"readlink -f '{p}'") for p in (a, b))
    return bool(real_a.startswith("/dev/dm-") and real_a == real_b)


def module_node(request: pytest.FixtureRequest, disk: Path, rundir: Path,
                attach: tuple[Path, ...] = (), guestfwd: tuple[tuple[int, int], ...] = (),
                firmware: str = "bios") -> Iterator[Guest]:
    """A guest booted from an installed disk (through an overlay) for a module's tests."""
    guests: list[Guest] = []
    request.module._imgbase_guests = guests
    guest = Guest(VmSpec(disk=disk, attach=attach, guestfwd=guestfwd, firmware=firmware),
                  rundir=rundir)
    guests.append(guest)
    guest.start()
    guest.wait_ssh()
    yield guest
    guest.stop()


def mount_media(guest: Guest) -> None:
    """Mount the media disk (vdb) at MEDIA, again after a reboot."""
    guest.run(f"mkdir -p {MEDIA} && (mountpoint -q {MEDIA} || mount -o ro /dev/vdb {MEDIA})")
