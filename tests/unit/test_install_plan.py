"""The install planner is pure: facts in, steps out."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from imgbase.errors import InputError
from imgbase.node.install import InstallFacts, gather_facts, parse_size, plan_install
from imgbase.plan import Plan, Step
from tests.conftest import imgbase_cli

FACTS = InstallFacts(disk="/dev/vdb", disk_size=20 << 30, image="/dev/vda",
                     nvr="imgbase-node-1.0-1", kernel="6.1.0-56-cloud-amd64",
                     kernel_args=("console=ttyS0,115200",), primary_mac="52:54:00:12:34:56")


def step(plan: Plan, name: str) -> Step:
    return next(s for s in plan.steps if s.name == name)


def test_plan_makes_base_readonly_then_layer() -> None:
    plan = plan_install(FACTS)
    names = [s.name for s in plan.steps]
    assert names.index("base-unpack") < names.index("base-complete") < \
        names.index("layer-create")
    assert names[-1] == "deactivate" and names[0] == "wipe"
    layer = step(plan, "layer-create").argv
    assert "imgbase-node-1.0-1+1" in layer and "imgbase:layer" in layer
    assert step(plan, "base-complete").argv[-1] == "imgbase/imgbase-node-1.0-1"


def test_every_made_lv_is_marked_incomplete_until_its_last_step() -> None:
    plan = plan_install(FACTS)
    names = [s.name for s in plan.steps]
    for create, complete in (("base-create", "base-complete"),
                             ("layer-create", "layer-complete"),
                             ("volume-var", "volume-var-complete")):
        assert "imgbase:incomplete" in step(plan, create).argv
        argv = step(plan, complete).argv
        assert argv[0] == "lvchange" and argv[argv.index("--deltag") + 1] == "imgbase:incomplete"
        assert names.index(create) < names.index(complete)
    assert names.index("layer-complete") > names.index("boot-default")


def test_pool_gets_the_autoextend_profile() -> None:
    argv = step(plan_install(FACTS), "pool").argv
    assert argv[argv.index("--metadataprofile") + 1] == "imgbase-thin"


def test_wipe_removes_the_old_volume_groups_first() -> None:
    from dataclasses import replace

    names = [s.name for s in plan_install(replace(FACTS, wipe_vgs=("old",))).steps]
    assert names[:3] == ["deactivate-old", "remove-vg-old", "wipe"]


def test_fstab_has_layer_root_and_var_with_discard() -> None:
    path, text = step(plan_install(FACTS), "layer-fstab").write  # type: ignore[misc]
    assert path.endswith("/root/etc/fstab")
    assert "/dev/imgbase/imgbase-node-1.0-1+1 / ext4 defaults,discard 0 1" in text
    assert "/dev/imgbase/var /var ext4 defaults,discard 0 2" in text


def test_boot_entry_boots_the_layer_with_image_kargs() -> None:
    _, entry = step(plan_install(FACTS), "boot-entries").write  # type: ignore[misc]
    assert "--id 'imgbase-node-1.0-1+1'" in entry
    assert "root=/dev/imgbase/imgbase-node-1.0-1+1 rw console=ttyS0,115200" in entry
    path, env = step(plan_install(FACTS), "boot-default").write  # type: ignore[misc]
    assert path.endswith("/boot/grub/grubenv") and len(env) == 1024
    assert "\nsaved_entry=imgbase-node-1.0-1+1\n" in env


def test_nist_profile_adds_tagged_volumes() -> None:
    from dataclasses import replace

    plan = plan_install(replace(FACTS, volumes="nist", pool_size="15G"))
    volumes = [s for s in plan.steps if s.argv[:1] == ("lvcreate",) and "imgbase:volume" in s.argv]
    assert [s.argv[s.argv.index("-n") + 1] for s in volumes] == [
        "var", "var_log", "var_log_audit", "var_crash", "var_tmp", "home", "tmp"]
    assert "imgbase:mount=/var/log/audit" in volumes[2].argv
    assert "15G" in step(plan, "pool").argv
    _, fstab = step(plan, "layer-fstab").write  # type: ignore[misc]
    mounts = [line.split()[1] for line in fstab.splitlines()]
    assert mounts.index("/var") < mounts.index("/var/log") < mounts.index("/var/log/audit")


def test_nvme_partitions() -> None:
    from dataclasses import replace

    assert step(plan_install(replace(FACTS, disk="/dev/nvme0n1")), "pv").argv[-1] == \
        "/dev/nvme0n1p4"


def test_bad_nvr_is_refused() -> None:
    from dataclasses import replace

    with pytest.raises(InputError, match="not a name-version-release"):
        plan_install(replace(FACTS, nvr="node"))


def test_missing_disk_is_refused(tmp_path: Path) -> None:
    (tmp_path / "img").write_text("x")
    with pytest.raises(InputError, match="no such disk"):
        gather_facts(str(tmp_path / "nope"), lambda: pytest.fail("verified before the disk"),
                     volumes="minimal", pool_size=None, wipe=False)


def test_menu_timeout_goes_into_the_first_grubenv() -> None:
    from dataclasses import replace

    from imgbase.bootloader import grubenv

    env = grubenv.parse(step(plan_install(replace(FACTS, menu_timeout=0)), "boot-default").write[1])
    assert env == {"saved_entry": "imgbase-node-1.0-1+1", "imgbase_timeout": "0"}
    assert "imgbase_timeout" not in step(plan_install(FACTS), "boot-default").write[1]


def test_a_bad_menu_timeout_is_refused_first(tmp_path: Path) -> None:
    proc = imgbase_cli("install", "--disk", str(tmp_path / "nope"), "--menu-timeout", "-3")
    assert proc.returncode == 2 and "menu timeout -3 is out of range" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_missing_image_is_refused(tmp_path: Path) -> None:
    proc = imgbase_cli("install", "--disk", "/dev/null", str(tmp_path / "no.squashfs"))
    assert proc.returncode == 2 and "no such image" in proc.stderr


@pytest.mark.parametrize("size", ["20", "0G", "1.5G", "20GB", "-1G"])
def test_bad_pool_size_is_refused(size: str) -> None:
    with pytest.raises(InputError, match="is not a size"):
        parse_size(size)


def test_regular_file_is_not_a_disk(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    proc = imgbase_cli("install", "--disk", str(tmp_path / "f"), str(tmp_path / "f"))
    assert proc.returncode == 2 and "is not a block device" in proc.stderr
    assert (tmp_path / "f").read_text() == "x"


def test_join_writes_the_agent_config_and_tls_files_into_the_layer(tmp_path: Path) -> None:
    from dataclasses import replace

    from imgbase.node import agentconfig as config
    from imgbase.node.install import join_config

    for name in ("ca.pem", "node.pem", "node-key.pem", "pw"):
        (tmp_path / name).write_text(name)
    join = join_config("https://10.0.0.1:2379,https://10.0.0.2:2379", "rack1",
                       str(tmp_path / "ca.pem"), str(tmp_path / "node.pem"),
                       str(tmp_path / "node-key.pem"), user="node7",
                       password_file=str(tmp_path / "pw"))
    plan = plan_install(replace(FACTS, join=join))
    names = [s.name for s in plan.steps]
    assert names.index("agent-config") < names.index("layer-umount")
    path, text = step(plan, "agent-config").write  # type: ignore[misc]
    assert path.endswith("/root/etc/imgbase/agent.toml")
    c = config.parse(text, Path(path))
    assert c.endpoints == ("https://10.0.0.1:2379", "https://10.0.0.2:2379")
    assert (c.group, c.key) == ("rack1", "/etc/imgbase/agent/node-key.pem")
    assert (c.user, c.password_file) == ("node7", "/etc/imgbase/agent/etcd-password")
    for name in ("node-key.pem", "etcd-password"):
        argv = step(plan, f"agent-{name}").argv
        assert argv[:4] == ("install", "-D", "-m", "600") and argv[-1].endswith(
            f"/root/etc/imgbase/agent/{name}")
    assert "agent-config" not in [s.name for s in plan_install(FACTS).steps]


def test_join_refuses_bad_endpoints_and_missing_files(tmp_path: Path) -> None:
    from imgbase.node.install import join_config

    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    auth = {"user": "node7", "password_file": str(pw)}
    with pytest.raises(InputError, match=r"is not an http\(s\) URL of an etcd member"):
        join_config("etcd1:2379", "default", None, None, None, **auth)
    with pytest.raises(InputError, match="is plain http"):
        join_config("http://e:2379", "default", None, None, None, **auth)
    with pytest.raises(InputError, match="needs the node's etcd user"):
        join_config("https://e:2379", "default", None, None, None)
    with pytest.raises(InputError, match="no such file"):
        join_config("https://e:2379", "default", str(tmp_path / "ca.pem"), None, None, **auth)
    lab = join_config("http://e:2379", "default", None, None, None, insecure_http=True)
    assert "insecure_http = true" in lab.agent_toml


def test_join_group_cannot_inject_a_migrate_hook(tmp_path: Path) -> None:
    """Finding 8: `--group 'g"<newline>migrate_hook = "/tmp/x'` wrote a hook the agent runs
    as root; now the group is refused and nothing is planned."""
    from imgbase.node.install import join_config

    with pytest.raises(InputError, match="is not a name"):
        join_config("https://e:2379", 'g"\nmigrate_hook = "/tmp/x"\ndomains = "migrate', None,
                    None, None, insecure_http=True)


def test_a_signed_install_tags_its_base_and_starts_the_anti_rollback_record() -> None:
    import json

    plan = plan_install(replace(FACTS, key="0123ABCD"))
    names = [s.name for s in plan.steps]
    tag = step(plan, "base-key").argv
    assert tag == ("lvchange", "--addtag", "imgbase:key:0123ABCD",
                   "imgbase/imgbase-node-1.0-1")
    assert names.index("base-unpack") < names.index("base-key") < names.index("base-complete")
    record = step(plan, "accepted").write
    assert record is not None
    assert record[0] == "/run/imgbase/install/root/var/lib/imgbase/accepted.json"
    assert json.loads(record[1]) == {"imgbase-node": "imgbase-node-1.0-1"}
    # in the layer's /var before the /var volume is filled from it
    assert names.index("layer-mount") < names.index("accepted") < names.index("fill-var")
    assert "base-key" not in [s.name for s in plan_install(FACTS).steps]  # unsigned


def test_install_of_an_unsigned_image_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "n-1.0-1.squashfs"
    image.write_bytes(b"not checked yet")
    disk = tmp_path / "disk"
    proc = imgbase_cli("install", "--disk", "/dev/loop-nope", str(image))
    assert proc.returncode == 2 and "no such disk" in proc.stderr  # the disk first
    proc = imgbase_cli("install", "--insecure", "--disk", str(disk), str(image))
    assert proc.returncode == 2 and "--insecure is not allowed on this node" in proc.stderr
    assert not disk.exists()


def test_install_and_base_add_verify_the_image(tmp_path: Path) -> None:
    from imgbase.node import install

    image = tmp_path / "n-1.0-1.squashfs"
    image.write_bytes(b"an image nobody signed")
    with pytest.raises(InputError, match=r"n-1.0-1.squashfs.sha256 is missing: the image"):
        install.verify(str(image), insecure=False)
    proc = imgbase_cli("base", "--add", str(image))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "n-1.0-1.squashfs.sha256 is missing: the image cannot be verified" in proc.stderr
    proc = imgbase_cli("base", "--add", str(image), "--insecure")
    assert proc.returncode == 2 and "--insecure is not allowed on this node" in proc.stderr
