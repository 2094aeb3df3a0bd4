"""Post-processing steps on small trees: each changes exactly what it claims."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imgbase.compose import postprocess
from imgbase.errors import ImgbaseError
from imgbase.image.spec import LayerSpec, load_image


def fake_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for d in ("etc/ssh", "var/lib/dpkg/info", "var/lib/apt/lists", "var/cache/apt",
              "var/log/apt", "var/lib/dbus", "tmp", "boot"):
        (tree / d).mkdir(parents=True)
    (tree / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (tree / "var/lib/dbus/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    for key in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "ssh_host_rsa_key"):
        (tree / "etc/ssh" / key).write_text("secret")
    (tree / "etc/ssh/sshd_config").write_text("PermitRootLogin prohibit-password\n")
    (tree / "etc/resolv.conf").write_text("nameserver 10.0.0.1\n")
    (tree / "var/lib/dpkg/status").write_text("Package: bash\nStatus: install ok installed\n")
    (tree / "var/lib/apt/lists/deb.debian.org_dists").write_text("x")
    (tree / "var/cache/apt/pkgcache.bin").write_text("x")
    (tree / "var/log/apt/history.log").write_text("x")
    (tree / "tmp/junk").write_text("x")
    return tree


def test_scrub_removes_node_identity_and_litter(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    postprocess.scrub(tree)
    assert (tree / "etc/machine-id").read_text() == ""
    assert not (tree / "var/lib/dbus/machine-id").exists()
    assert sorted(p.name for p in (tree / "etc/ssh").iterdir()) == ["sshd_config"]
    assert not (tree / "etc/resolv.conf").exists()
    assert os.listdir(tree / "var/lib/apt/lists") == ["partial"]
    assert os.listdir(tree / "var/cache/apt") == []
    assert not (tree / "var/log/apt/history.log").exists()
    assert os.listdir(tree / "tmp") == []


def test_package_db_moves_into_the_image_and_stays_reachable(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    postprocess.move_package_db(tree, ("var/lib/dpkg",))
    link = tree / "var/lib/dpkg"
    assert link.is_symlink() and not os.readlink(link).startswith("/")
    assert (tree / "usr/lib/sysimage/dpkg/status").is_file()
    assert (link / "status").read_text().startswith("Package: bash")
    rule = (tree / "usr/lib/tmpfiles.d/imgbase-package-db.conf").read_text()
    assert "L+ /var/lib/dpkg - - - - ../../usr/lib/sysimage/dpkg" in rule
    # idempotent: a second run leaves the link alone
    postprocess.move_package_db(tree, ("var/lib/dpkg",))
    assert (link / "status").is_file()


def test_factory_etc_is_a_copy_of_etc(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    postprocess.factory_etc(tree)
    assert (tree / "usr/share/factory/etc/ssh/sshd_config").read_text().startswith("PermitRoot")


def test_clamp_mtimes(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    old = tree / "etc/ssh/sshd_config"
    os.utime(old, (1000, 1000))
    os.symlink("nowhere", tree / "dangling")
    changed = postprocess.clamp_mtimes(tree, 5000)
    assert changed > 5
    assert old.stat().st_mtime == 1000  # older files keep their time
    assert all(p.lstat().st_mtime <= 5000 for p in tree.rglob("*"))
    assert (tree / "dangling").lstat().st_mtime == 5000


def test_apply_files_overlays_tree_with_modes(tmp_path: Path, root_dir: Path) -> None:
    image = load_image(root_dir / "images/node.toml")
    base = image.layers[0]
    tree = fake_tree(tmp_path)
    n = postprocess.apply_files(tree, base)
    unit = tree / "usr/lib/systemd/system/imgbase-ssh-hostkeys.service"
    assert n >= 2 and "ssh-keygen -q -t ed25519" in unit.read_text()
    assert unit.stat().st_uid == 0


def test_image_json_carries_the_nvr(tmp_path: Path, root_dir: Path) -> None:
    image = load_image(root_dir / "images/node.toml")
    tree = fake_tree(tmp_path)
    postprocess.write_image_json(tree, image, "abc")
    info = json.loads((tree / postprocess.IMAGE_JSON).read_text())
    assert info["nvr"] == str(image.nvr) and info["inputs_digest"] == "abc"
    assert info["kernel_args"] == ["console=tty0", "console=ttyS0,115200"]


def test_the_copied_deb_goes_but_packaged_dirs_stay(tmp_path: Path) -> None:
    """mmdebstrap leaves the local .deb at its host path in the tree; with the cache under
    /var/tmp, removing it must not take /var/tmp (a base-files directory) along."""
    from imgbase.compose.mmdebstrap import _remove_copied_deb

    tree = tmp_path / "tree"
    deb = Path("/var/tmp/cache/work/abc/imgbase_0.1.0_all.deb")
    copy = tree / deb.relative_to("/")
    copy.parent.mkdir(parents=True)
    copy.write_text("deb")
    (tree / "var/lib/dpkg/info").mkdir(parents=True)
    (tree / "var/lib/dpkg/info/base-files.list").write_text("/.\n/var\n/var/tmp\n")
    _remove_copied_deb(tree, deb)
    assert (tree / "var/tmp").is_dir() and not any((tree / "var/tmp").iterdir())


def layer_with_files(tmp_path: Path, files: dict[str, str]) -> LayerSpec:
    root = tmp_path / "layers/site/files"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return LayerSpec(name="site", path=tmp_path / "layers/site.toml", files=root)


def test_apply_files_resolves_the_trees_symlinks_inside_the_tree(tmp_path: Path) -> None:
    """Debian's var/run -> /run and var/lock -> /run/lock: a layer file under them goes
    to the tree's /run, never the build host's."""
    host = tmp_path / "host-run"  # stands for the build host's /run
    host.mkdir()
    name = f"imgbase-test-{os.getpid()}"
    tree = fake_tree(tmp_path)
    os.symlink(host, tree / "var/run")  # absolute, as the image has it
    (tree / "run/lock").mkdir(parents=True)
    os.symlink("/run/lock", tree / "var/lock")
    layer = layer_with_files(tmp_path, {"var/run/x.conf": "x", f"var/lock/{name}": "y"})
    try:
        assert postprocess.apply_files(tree, layer) == 2
        assert os.listdir(host) == [] and not os.path.lexists(f"/run/lock/{name}")
    finally:
        for leaked in (host / "x.conf", Path(f"/run/lock/{name}")):
            leaked.unlink(missing_ok=True)
    assert (tree / str(host).lstrip("/") / "x.conf").read_text() == "x"
    assert (tree / "run/lock" / name).read_text() == "y"
    assert os.readlink(tree / "var/run") == str(host)  # the links stay as they were


def test_apply_files_refuses_a_tree_symlink_that_climbs_out(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    os.symlink("../../..", tree / "etc/up")
    layer = layer_with_files(tmp_path, {"etc/up/escaped": "x"})
    with pytest.raises(ImgbaseError, match="cannot go into the tree"):
        postprocess.apply_files(tree, layer)
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


def test_scrub_does_not_follow_the_trees_symlinks_out(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "keep").write_text("host's")
    (host / "hostname").write_text("buildhost\n")
    tree = fake_tree(tmp_path)
    os.symlink(host, tree / "var/tmp")  # emptied as the tree's, not the host's
    os.symlink(host / "hostname", tree / "etc/hostname")
    postprocess.scrub(tree)
    assert (host / "keep").read_text() == "host's"
    assert (host / "hostname").read_text() == "buildhost\n"
    assert (tree / "etc/hostname").read_text() == "localhost\n"
    assert not (tree / "etc/hostname").is_symlink()


def test_dropped_kernel_modules_stay_inside_the_kernels_tree(tmp_path: Path,
                                                             monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A module directory that is a link out of the tree, or a kernel/ that is one, is
    never followed: only the kernel's own directories go."""
    from imgbase.compose import postprocess as pp

    tree, host = tmp_path / "tree", tmp_path / "host"
    (host / "sound").mkdir(parents=True)
    (host / "sound/keep.ko").write_text("host file")
    k1 = tree / "usr/lib/modules/6.1-a/kernel"
    (k1 / "sound").mkdir(parents=True)
    (k1 / "sound/x.ko").write_text("x")
    (k1 / "drivers").mkdir()
    (k1 / "drivers/media").symlink_to(host / "sound")  # a link out: left alone
    (tree / "usr/lib/modules/6.1-b").mkdir()
    (tree / "usr/lib/modules/6.1-b/kernel").symlink_to(host)  # kernel/ itself a link out
    depmod: list[str] = []
    monkeypatch.setattr(pp, "chroot_run", lambda t, argv: depmod.append(argv[-1]) or "")
    gone = pp.drop_kernel_modules(tree, ("sound", "drivers/media"))
    assert gone == 1 and not (k1 / "sound").exists()
    assert (host / "sound/keep.ko").read_text() == "host file"
    assert depmod == ["6.1-a"]
