"""`imgbase reset`: a fresh layer of the booted base, the node's identity carried, the
factory /etc otherwise, /var untouched; on trial with the booted layer as the fallback."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from imgbase.bootloader import grubenv
from imgbase.errors import InputError
from imgbase.node import reset
from tests.unit.test_node_plans import NVR, names, node

FSTAB = ("LABEL=boot /boot ext4 defaults 0 2\nUUID=0A1B-2C3D /boot/efi vfat umask=0077 0 1\n"
         "/dev/vg/gone /srv ext4 defaults 0 2\n")  # an admin's line that stops the boot


def facts(carry: tuple[str, ...] = ("etc/hostname",)) -> reset.ResetFacts:
    return reset.ResetFacts(node(), FSTAB, carry)


def test_a_new_layer_of_the_booted_base_with_the_identity_then_its_fstab() -> None:
    plan = reset.plan_reset(facts(("etc/hostname", "etc/imgbase", "root/.ssh")))
    steps = {s.name: s for s in plan.steps}
    order = names(plan)
    assert steps["layer-create"].argv[-1] == f"vg/{NVR}" and f"{NVR}+2" in \
        steps["layer-create"].argv
    carry = steps["carry"].argv
    assert carry[:4] == ("rsync", "-aHAX", "--relative", "--delete")
    assert carry[4:] == ("/./etc/hostname", "/./etc/imgbase", "/./root/.ssh",
                         "/run/imgbase/work/reset/")
    assert order.index("carry") < order.index("layer-fstab") < order.index("layer-complete")
    _, fstab = steps["layer-fstab"].write  # type: ignore[misc]
    assert fstab.splitlines()[0] == f"/dev/vg/{NVR}+2 / ext4 defaults,discard 0 1"
    assert "/boot/efi vfat" in fstab and "/dev/vg/var /var" in fstab
    assert "/srv" not in fstab  # nothing else of the running fstab
    _, env = steps["boot-default"].write  # type: ignore[misc]
    parsed = grubenv.parse(env)
    assert (parsed["saved_entry"], parsed["imgbase_tries"], parsed["imgbase_fallback"]) == (
        f"{NVR}+2", "3", f"{NVR}+1")
    assert order[-2:] == ["boot-default", "boot-commit"]
    assert not any("var" in s.argv for s in plan.steps if s.argv[:1] == ("lvremove",))


def test_factory_carries_nothing() -> None:
    assert "carry" not in names(reset.plan_reset(facts(())))


def test_refusals() -> None:
    with pytest.raises(InputError, match="not a layer"):
        reset.plan_reset(replace(facts(), node=replace(node(), booted=None)))
    pending = replace(node(), env={"saved_entry": f"{NVR}+9"})
    with pytest.raises(InputError, match="the default layer is"):
        reset.plan_reset(replace(facts(), node=pending))
    with pytest.raises(InputError, match="out of range"):
        reset.plan_reset(facts(), tries=0)


def test_carried_finds_what_exists_and_never_leaves_the_root(tmp_path: Path) -> None:
    (tmp_path / "etc/ssh").mkdir(parents=True)
    for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "sshd_config"):
        (tmp_path / "etc/ssh" / name).write_text("x")
    (tmp_path / "etc/hostname").write_text("n1\n")
    (tmp_path / "root").mkdir()
    (tmp_path / "root/.ssh").symlink_to("/etc")  # a link is carried as a link, not followed
    found = reset.carried(tmp_path, keep_etc=False, factory=False)
    assert found == ("etc/hostname", "etc/ssh/ssh_host_ed25519_key",
                     "etc/ssh/ssh_host_ed25519_key.pub", "root/.ssh")
    assert reset.carried(tmp_path, keep_etc=True, factory=False) == ("etc", "root/.ssh")
    assert reset.carried(tmp_path, keep_etc=False, factory=True) == ()
