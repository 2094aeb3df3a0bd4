"""`health` writes grubenv as every other grubenv writer does: under imgbase's lock, to a
mounted /boot, and never over a grubenv that changed since the verdict was made.

Real files, a real flock held from another open file (as another imgbase command holds
it), the real /boot commit (a sync on a directory that is not a mount point).
"""

from __future__ import annotations

import fcntl
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from imgbase.bootloader import grubenv
from imgbase.errors import InputError
from imgbase.node import health
from imgbase.node.facts import NodeFacts
from tests.unit.test_node_plans import NVR, node

A, B = f"{NVR}+1", f"{NVR}+2"
TRIAL = {"saved_entry": B, "imgbase_tries": "0", "imgbase_fallback": A}
VERDICT = {"saved_entry": A}  # fell back: the fallback is the default again


def boot_dir(tmp_path: Path) -> tuple[NodeFacts, Path]:
    (tmp_path / "boot/grub").mkdir(parents=True)
    env = tmp_path / "boot/grub/grubenv"
    env.write_text(grubenv.render(TRIAL))
    return replace(node(), env=dict(TRIAL), boot=tmp_path / "boot"), env


def hold(lock: Path) -> object:
    f = open(lock, "a+")  # noqa: SIM115 - held until the test lets go
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def test_health_waits_for_the_lock_then_writes(tmp_path: Path) -> None:
    f, env = boot_dir(tmp_path)
    lock = tmp_path / "lock"
    holder = hold(lock)
    let_go = threading.Timer(0.6, holder.close)  # type: ignore[attr-defined]
    let_go.start()
    t0 = time.monotonic()
    assert health.write_env(f, TRIAL, VERDICT, lock=lock, wait=10)
    assert time.monotonic() - t0 >= 0.5  # it did not write while the lock was held
    assert grubenv.parse(env.read_text()) == VERDICT and len(env.read_bytes()) == 1024


def test_health_does_not_write_while_another_command_holds_the_lock(tmp_path: Path) -> None:
    f, env = boot_dir(tmp_path)
    lock = tmp_path / "lock"
    holder = hold(lock)
    try:
        with pytest.raises(InputError, match="another imgbase operation is running"):
            health.write_env(f, TRIAL, VERDICT, lock=lock, wait=0.3)
    finally:
        holder.close()  # type: ignore[attr-defined]
    assert grubenv.parse(env.read_text()) == TRIAL


def test_a_grubenv_changed_meanwhile_is_left_to_its_writer(tmp_path: Path) -> None:
    f, env = boot_dir(tmp_path)
    meanwhile = {"saved_entry": "n-2.0-1+1", "imgbase_tries": "3", "imgbase_fallback": A}
    env.write_text(grubenv.render(meanwhile))  # the agent's boot --set-default
    assert not health.write_env(f, TRIAL, VERDICT, lock=tmp_path / "lock", wait=1)
    assert grubenv.parse(env.read_text()) == meanwhile


def test_health_does_not_write_grubenv_into_an_unmounted_boot(tmp_path: Path) -> None:
    f, env = boot_dir(tmp_path)
    f = replace(f, unmounted="/boot is not mounted (/etc/fstab mounts LABEL=boot there)")
    with pytest.raises(InputError, match="/boot is not mounted"):
        health.write_env(f, TRIAL, VERDICT, lock=tmp_path / "lock", wait=1)
    assert grubenv.parse(env.read_text()) == TRIAL
