"""Helpers shared by the tests of installed nodes."""

from __future__ import annotations

from typing import Any

NVR = "imgbase-node-1.0-1"


def same_device(host: Any, a: str, b: str) -> bool:
    """/dev/VG/LV and /dev/mapper/VG-LV name the same device-mapper node."""
    real_a, real_b = (host.check_output(f"readlink -f '{p}'") for p in (a, b))
    return bool(real_a.startswith("/dev/dm-") and real_a == real_b)
