"""Update packages, built for real with dpkg-deb and rpmbuild from a small imgbase image
whose own `imgbase` records how it was called: the post-install script must run *that*
imgbase (the new image's), on the packaged image, and treat "up to date" as success."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from imgbase import package, trust
from imgbase.errors import InputError

FAKE_MAIN = """import os, sys
with open(os.environ["IMGBASE_TEST_CALLS"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
raise SystemExit(int(os.environ.get("IMGBASE_TEST_RC", "0")))
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("pkg")
    tree = work / "tree"
    pkg = tree / "usr/lib/python3/dist-packages/imgbase"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_MAIN)
    meta = tree / "usr/lib/imgbase/image.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"name": "n", "version": "2.0", "release": "1", "nvr": "n-2.0-1",
                                "architecture": "amd64"}))
    image = work / "n-2.0-1.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(image), "-quiet", "-no-progress"], check=True)
    Path(f"{image}.sha256").write_text(f"{trust.sha256_of(str(image))}  {image.name}\n")
    Path(f"{image}.sha256.sig").write_bytes(b"pretend signature")  # carried, not checked here
    return image


def run_postinst(script: str, tmp_path: Path, rc: int, *args: str) -> tuple[int, list[str]]:
    calls = tmp_path / "calls"
    calls.write_text("")
    proc = subprocess.run(["sh", "-c", script, "postinst", *args], capture_output=True,
                          text=True, env={**os.environ, "IMGBASE_TEST_CALLS": str(calls),
                                          "IMGBASE_TEST_RC": str(rc)})
    return proc.returncode, calls.read_text().splitlines()


def test_deb_carries_the_image_and_updates_with_the_new_imgbase(image: Path,
                                                                tmp_path: Path) -> None:
    deb = package.build(str(image), "deb", tmp_path)
    assert deb.name == "n-image-update_2.0-1_amd64.deb"
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Depends"],
                            capture_output=True, text=True, check=True).stdout
    assert "Package: n-image-update" in fields and "Version: 2.0-1" in fields
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    assert "./usr/share/imgbase/images/n-2.0-1.squashfs\n" in listing
    assert "./usr/share/imgbase/images/n-2.0-1.squashfs.sha256\n" in listing
    unpacked = tmp_path / "unpacked"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(unpacked)], check=True)
    packed = unpacked / "usr/share/imgbase/images/n-2.0-1.squashfs"
    assert packed.read_bytes() == image.read_bytes()
    script = (unpacked / "DEBIAN/postinst").read_text().replace(
        "/usr/share/imgbase/images/n-2.0-1.squashfs", str(packed))
    assert run_postinst(script, tmp_path, 0, "configure") == (0, [f"update {packed}"])
    assert run_postinst(script, tmp_path, 77, "configure") == (0, [f"update {packed}"])
    assert run_postinst(script, tmp_path, 2, "configure")[0] == 2  # a refusal fails it
    assert run_postinst(script, tmp_path, 0, "abort-upgrade") == (0, [])


def test_rpm_carries_the_image_and_the_same_script(image: Path, tmp_path: Path) -> None:
    rpm = package.build(str(image), "rpm", tmp_path)
    assert rpm.name == "n-image-update-2.0-1.x86_64.rpm"
    files = subprocess.run(["rpm", "-qpl", str(rpm)], capture_output=True, text=True,
                           check=True).stdout.split()
    assert files == [f"/usr/share/imgbase/images/n-2.0-1.squashfs{s}"
                     for s in ("", ".sha256", ".sha256.sig")]
    scripts = subprocess.run(["rpm", "-qp", "--scripts", str(rpm)], capture_output=True,
                             text=True, check=True).stdout
    assert "postinstall scriptlet (using /bin/sh):" in scripts
    assert 'python3 -P -m imgbase update "$image"' in scripts
    requires = subprocess.run(["rpm", "-qp", "--requires", str(rpm)], capture_output=True,
                              text=True, check=True).stdout.split("\n")
    assert "imgbase" in requires
    post = scripts.split("postinstall scriptlet (using /bin/sh):\n", 1)[1]
    post = post.replace("/usr/share/imgbase/images/n-2.0-1.squashfs", str(image))
    assert run_postinst(post, tmp_path, 77) == (0, [f"update {image}"])


def test_bad_input_writes_nothing(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="no such image"):
        package.build(str(tmp_path / "nope.squashfs"), "deb", out)
    (tmp_path / "junk.squashfs").write_bytes(b"not a squashfs")
    with pytest.raises(InputError, match="not a readable squashfs"):
        package.build(str(tmp_path / "junk.squashfs"), "rpm", out)
    with pytest.raises(InputError, match="not a package format"):
        package.build(str(image), "apk", out)
    unsigned = tmp_path / "unsigned.squashfs"
    unsigned.write_bytes(image.read_bytes())
    Path(f"{unsigned}.sha256").write_text(f"{trust.sha256_of(str(unsigned))}  x\n")
    with pytest.raises(InputError, match="is not signed: nodes would refuse"):
        package.build(str(unsigned), "deb", out)
    assert list(out.iterdir()) == []
