"""Image and layer specs: every kind of bad input names file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imgbase.errors import InputError
from imgbase.image.spec import load_image, load_layer

IMAGE = """\
[image]
name = "node"
version = "1.0"
release = "1"
layers = ["base"]
source_date_epoch = 1700000000
"""
LAYER = """\
[layer]
name = "base"
packages = ["bash", "lvm2"]
"""


def write(tmp_path: Path, image: str = IMAGE, layer: str = LAYER) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers/base.toml").write_text(layer)
    img = tmp_path / "images/node.toml"
    img.write_text(image)
    return img


def error_of(img: Path) -> str:
    with pytest.raises(InputError) as exc:
        load_image(img)
    return exc.value.oneline()


def test_valid_image_loads_with_layers_in_order(tmp_path: Path) -> None:
    img = load_image(write(tmp_path))
    assert str(img.nvr) == "node-1.0-1"
    assert img.packages == ("bash", "lvm2")
    assert img.layers[0].name == "base"
    assert img.compression == "zstd" and img.compression_level == 3


def test_default_image_of_the_repo_loads(root_dir: Path) -> None:
    img = load_image(root_dir / "images/node.toml")
    names = [layer.name for layer in img.layers]
    assert names[:3] == ["base", "virt", "agent"]
    assert "libvirt-daemon-system" in img.packages
    assert any(layer.imgbase_package for layer in img.layers)
    assert img.layers[0].files is not None


def test_unknown_key_names_file_and_line(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, IMAGE + 'colour = "blue"\n'))
    assert "node.toml:7" in msg and "unknown key 'colour'" in msg


def test_unknown_key_in_layer_names_layer_file(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, layer=LAYER + "packagez = []\n"))
    assert "base.toml:4" in msg and "packagez" in msg


def test_toml_syntax_error_names_line(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, IMAGE.replace('release = "1"', "release = ")))
    assert "node.toml:4" in msg and "TOML syntax error" in msg


def test_wrong_type(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, IMAGE.replace('"1.0"', "1.0")))
    assert "node.toml:3" in msg and "'version' must be str" in msg


def test_duplicate_package_in_layer(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, layer=LAYER.replace('"lvm2"', '"bash"')))
    assert "base.toml:3" in msg and "listed twice" in msg


def test_duplicate_toml_key(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, IMAGE + 'name = "again"\n'))
    assert "node.toml:7" in msg


def test_layer_listed_twice(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, IMAGE.replace('["base"]', '["base", "base"]')))
    assert "listed twice" in msg


def test_missing_layer(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, IMAGE.replace('["base"]', '["base", "nope"]')))
    assert "layer 'nope' not found" in msg and "hint: layers available: base" in msg


def test_bad_package_name(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, layer=LAYER.replace('"lvm2"', '"LVM 2"')))
    assert "is not a valid name" in msg


def test_version_with_dash_is_refused(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, IMAGE.replace('"1.0"', '"1-0"')))
    assert "NVR" in msg


def test_compression_level_out_of_range(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, IMAGE + "compression_level = 40\n"))
    assert "outside 1..22" in msg


def test_layer_name_must_match_file(tmp_path: Path) -> None:
    write(tmp_path, layer=LAYER.replace('"base"', '"other"'))
    with pytest.raises(InputError, match="differs from its file name"):
        load_layer(tmp_path / "layers/base.toml")


def test_missing_hook_is_an_error(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, layer=LAYER + 'hooks = ["hooks/10-x.sh"]\n'))
    assert "hook 'hooks/10-x.sh' not found" in msg


def test_kernel_arg_with_quote_is_refused(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, layer=LAYER + "kernel_args = ['a=\"b c\"']\n"))
    assert "cannot go into a boot entry" in msg


@pytest.mark.parametrize("karg", ["a}", "x=$y", "x=`id`", "a{", "a\\nb"])
def test_kernel_arg_that_a_boot_entry_cannot_hold_is_refused(tmp_path: Path,
                                                             karg: str) -> None:
    """What kargs.UNSAFE refuses on a node is refused at compose already: one such
    argument would leave GRUB a menu it cannot parse."""
    layer = LAYER + f"kernel_args = ['console=ttyS0', '{karg}']\n"
    msg = error_of(write(tmp_path, layer=layer))
    assert msg.startswith(f"{tmp_path}/layers/base.toml:4: kernel argument ") and \
        "cannot go into a boot entry" in msg and "(hint: " in msg, msg


@pytest.mark.parametrize("karg, says", [("root=/dev/sda1", "root= is set by imgbase"),
                                        ("x=" + "a" * 1100, "cannot go into a boot entry")])
def test_kernel_arg_a_node_would_refuse_is_refused_at_compose(tmp_path: Path, karg: str,
                                                              says: str) -> None:
    """The same gate as the node's (kargs.check_arg): an image every node would refuse at
    update is not composed."""
    msg = error_of(write(tmp_path, layer=LAYER + f"kernel_args = ['{karg}']\n"))
    assert msg.startswith(f"{tmp_path}/layers/base.toml:4: ") and says in msg, msg


@pytest.mark.parametrize("key, value", [
    ("mirror", "[trusted=yes] http://x"),
    ("mirror", "http://x/debian\ndeb [trusted=yes] http://evil/ sid main"),
    ("mirror", "http://x/debian bookworm-backports"),
    ("mirror", "ftp://x/debian"),
    ("security_mirror", "http://x/debian-security [trusted=yes]"),
    ("suite", "bookworm main\ndeb http://evil/ sid"),
    ("suite", "bookworm [trusted=yes]"),
    ("architecture", "amd64 --hook-dir=/tmp"),
])
def test_mirror_and_suite_that_would_add_to_a_sources_line_are_refused(
        tmp_path: Path, key: str, value: str) -> None:
    image = IMAGE + f"{key} = {json.dumps(value)}\n"
    msg = error_of(write(tmp_path, image))
    assert msg.startswith(f"{tmp_path}/images/node.toml:7: {key} ") and "(hint: " in msg, msg


def test_plain_mirror_suite_and_file_url_still_load(tmp_path: Path) -> None:
    image = IMAGE + ('mirror = "file:///srv/mirror/debian"\nsuite = "trixie"\n'
                     'security_mirror = "https://security.debian.org/debian-security"\n')
    img = load_image(write(tmp_path, image))
    assert (img.mirror, img.suite) == ("file:///srv/mirror/debian", "trixie")


@pytest.mark.parametrize("version, phrase", [
    ("1" * 5000, "more than 64"),  # LVM names stop at 127: the layer is <nvr>+<n>
    ("1.0~rc1", "cannot name an LVM volume"),
    ("1_tmeta", "cannot name an LVM volume"),
    ("1.0\n", "is not a name-version-release"),
])
def test_a_version_that_cannot_name_a_volume_is_refused(tmp_path: Path, version: str,
                                                        phrase: str) -> None:
    msg = error_of(write(tmp_path, IMAGE.replace('"1.0"', json.dumps(version))))
    assert msg.startswith(f"{tmp_path}/images/node.toml:3: ") and phrase in msg, msg
    assert len(msg) < 400


def test_the_longest_nvr_its_layers_and_device_names_fit_lvm(tmp_path: Path) -> None:
    version = "1." + "9" * (64 - len("node--1") - 2)
    img = load_image(write(tmp_path, IMAGE.replace('"1.0"', f'"{version}"')))
    layer = f"{img.nvr}+999"
    assert len(str(img.nvr)) == 64 and len(layer) <= 127
    assert len("imgbase-" + layer.replace("-", "--")) <= 127  # device-mapper's name


@pytest.mark.parametrize("hook", ["/etc/shadow", "../../outside.sh", "hooks/../../x.sh",
                                  "hooks/link.sh"])
def test_a_hook_out_of_the_layer_directory_is_refused(tmp_path: Path, hook: str) -> None:
    img = write(tmp_path, layer=LAYER + f'hooks = ["{hook}"]\n')
    (tmp_path / "outside.sh").write_text("#!/bin/sh\n")  # exists: not a "not found"
    (tmp_path / "layers/x.sh").write_text("#!/bin/sh\n")
    (tmp_path / "layers/base/hooks").mkdir(parents=True)
    (tmp_path / "layers/base/hooks/link.sh").symlink_to("/etc/shadow")
    msg = error_of(img)
    assert msg.startswith(f"{tmp_path}/layers/base.toml:4: hook ") and "(hint: " in msg, msg
    assert "not found" not in msg


def test_a_hook_linked_within_the_layer_directory_loads(tmp_path: Path) -> None:
    img = write(tmp_path, layer=LAYER + 'hooks = ["hooks/10-x.sh"]\n')
    (tmp_path / "layers/base/hooks").mkdir(parents=True)
    (tmp_path / "layers/base/shared.sh").write_text("#!/bin/sh\n")
    (tmp_path / "layers/base/hooks/10-x.sh").symlink_to("../shared.sh")
    assert load_image(img).layers[0].hooks == ((tmp_path / "layers/base/shared.sh"),)


def test_a_files_tree_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    """files/ -> /etc would copy the build host's /etc into the image."""
    img = write(tmp_path)
    (tmp_path / "layers/base").mkdir()
    (tmp_path / "layers/base/files").symlink_to("/etc")
    msg = error_of(img)
    assert "files is a symlink" in msg and "(hint: " in msg


def test_a_fifo_in_the_files_tree_is_refused(tmp_path: Path) -> None:
    img = write(tmp_path)
    (tmp_path / "layers/base/files").mkdir(parents=True)
    os.mkfifo(tmp_path / "layers/base/files/pipe")
    assert "files/ holds " in (msg := error_of(img)) and "pipe, a special file" in msg


def test_services_both_enabled_and_masked(tmp_path: Path) -> None:
    layer = LAYER + '[services]\nenable = ["ssh"]\nmask = ["ssh"]\n'
    msg = error_of(write(tmp_path, layer=layer))
    assert "both enabled and disabled/masked" in msg


def test_layer_digest_changes_with_files_and_hooks(tmp_path: Path) -> None:
    img = write(tmp_path, layer=LAYER + 'hooks = ["hooks/10-x.sh"]\n')
    hook = tmp_path / "layers/base/hooks/10-x.sh"
    hook.parent.mkdir(parents=True)
    hook.write_text("#!/bin/sh\ntrue\n")
    d1 = load_image(img).layers[0].digest()
    hook.write_text("#!/bin/sh\nfalse\n")
    d2 = load_image(img).layers[0].digest()
    files = tmp_path / "layers/base/files/etc"
    files.mkdir(parents=True)
    (files / "motd").write_text("hi\n")
    d3 = load_image(img).layers[0].digest()
    assert len({d1, d2, d3}) == 3


def test_source_date_epoch_from_environment(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234567890")
    assert load_image(write(tmp_path)).source_date_epoch == 1234567890


def test_the_package_tree_key_follows_packages_and_sources_not_layer_files(
        root_dir: Path, tmp_path: Path) -> None:
    """compose reuses a cached package tree when only layers' files, hooks or services
    (or the version) changed; any change to what is installed, or from where, is a new
    tree."""
    import shutil
    from dataclasses import replace

    from imgbase.compose.build import inputs_digest
    from imgbase.compose.treecache import tree_digest

    for part in ("images", "layers"):
        shutil.copytree(root_dir / part, tmp_path / part)
    image, site = tmp_path / "images/node.toml", tmp_path / "layers/site.toml"
    v1 = load_image(image)
    (tmp_path / "layers/site/files/etc/site-note").write_text("changed\n")
    site.write_text(site.read_text() + '\n[services]\nenable = ["fstrim.timer"]\n')
    v2 = replace(load_image(image), version="1.1")
    assert inputs_digest(v2) != inputs_digest(v1)  # a new image...
    assert tree_digest(v2, "mmdebstrap") == tree_digest(v1, "mmdebstrap")  # ...same tree
    site.write_text(site.read_text().replace("[services]", 'packages = ["htop"]\n\n[services]'))
    more = load_image(image)
    assert "htop" in more.packages
    for changed in (more, replace(v1, mirror="http://mirror.example/debian"),
                    replace(v1, suite="trixie")):
        assert tree_digest(changed, "mmdebstrap") != tree_digest(v1, "mmdebstrap")
    assert tree_digest(v1, "dnf") != tree_digest(v1, "mmdebstrap")


def test_kernel_flavour_is_a_layer_setting(tmp_path: Path, root_dir: Path) -> None:
    img = load_image(write(tmp_path, layer=LAYER.replace("[layer]", '[layer]\nkernel = "amd64"')))
    assert img.layers[0].kernel == "amd64" and img.packages[0] == "linux-image-amd64"
    default = load_image(root_dir / "images/node.toml")
    assert "linux-image-amd64" in default.packages  # the generic kernel, signed
    assert not any(p.startswith("linux-image-cloud") for p in default.packages)


@pytest.mark.parametrize("layer, message", [
    ('[layer]\nname = "base"\nkernel = "amd64; rm"\n',
     "base.toml:3: kernel flavour 'amd64; rm' is not"),
    ('[layer]\nname = "base"\nkernel = "amd64"\npackages = ["linux-image-rt-amd64"]\n',
     "base.toml:4: the layer sets kernel = 'amd64' and also lists linux-image-rt-amd64"),
])
def test_bad_kernel_setting(tmp_path: Path, layer: str, message: str) -> None:
    assert message in error_of(write(tmp_path, layer=layer))


def test_two_layers_with_a_kernel_are_refused(tmp_path: Path) -> None:
    img = write(tmp_path, image=IMAGE.replace('["base"]', '["base", "other"]'),
                layer=LAYER.replace("[layer]", '[layer]\nkernel = "amd64"'))
    (tmp_path / "layers/other.toml").write_text('[layer]\nname = "other"\nkernel = "cloud-amd64"\n')
    assert "layers 'base' and 'other' both set a kernel" in error_of(img)
    (tmp_path / "layers/other.toml").write_text('[layer]\nname = "other"\n'
                                                'packages = ["linux-image-cloud-amd64"]\n')
    assert "and layer 'other' lists linux-image-cloud-amd64: two kernels" in error_of(img)


def test_kernel_modules_exclude(tmp_path: Path) -> None:
    img = load_image(write(tmp_path, layer=LAYER + 'kernel_modules_exclude = ["sound", '
                           '"drivers/media"]\n'))
    assert img.kernel_modules_exclude == ("sound", "drivers/media")
    for bad in ('"../etc"', '"/lib"', '"sound; rm"', '"drivers/../../x"'):
        text = LAYER + f"kernel_modules_exclude = [{bad}]\n"
        (tmp_path / "layers/base.toml").write_text(text)
        assert "base.toml:4: " in error_of(tmp_path / "images/node.toml"), bad
