"""Update packages, built for real with dpkg-deb and rpmbuild from small imgbase images
signed with a real OpenPGP key. Each image's own `imgbase` records how it was called: the
post-install script must verify the image with the node's imgbase (here: this tree's) and
keys first, then run *the image's* imgbase on that verified copy, and treat "up to date" as
success. An image that is not signed by a trusted key, or whose image.json would put
anything but a plain name, version and release into the package, is refused at build time
with nothing written."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import imgbase
from imgbase.errors import InputError
from imgbase.image import package, trust
from imgbase.image.squashfs import sha256_file

FAKE_MAIN = """import os, sys
mode = oct(os.stat(os.path.dirname(sys.argv[-1])).st_mode & 0o7777)
with open(os.environ["IMGBASE_TEST_CALLS"], "a") as f:
    f.write(" ".join([os.path.dirname(os.path.abspath(__file__)), mode, *sys.argv[1:]]) + "\\n")
raise SystemExit(int(os.environ.get("IMGBASE_TEST_RC", "0")))
"""
GOOD = {"name": "n", "version": "2.0", "release": "1", "nvr": "n-2.0-1", "architecture": "amd64"}
THIS_IMGBASE = str(Path(imgbase.__file__).resolve().parents[1])  # the node's installed one




def make_image(work: Path, image_json: str, signer: Path | None,
               name: str = "n-2.0-1.squashfs") -> Path:
    """A squashfs with image_json and a recording imgbase, its .sha256, signed by signer."""
    tree = work / f"tree-{name}"
    pkg = tree / "usr/lib/python3/dist-packages/imgbase"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_MAIN)
    meta = tree / "usr/lib/imgbase/image.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(image_json)
    image = work / name
    subprocess.run(["mksquashfs", str(tree), str(image), "-quiet", "-no-progress"], check=True)
    Path(f"{image}.sha256").write_text(f"{sha256_file(str(image))}  {image.name}\n")
    if signer is not None:
        trust.sign(str(image), homedir=str(signer))
    return image


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> Path:
    return make_image(tmp_path_factory.mktemp("pkg"), json.dumps(GOOD), keys["home"])


def node_script(script: str, packed: Path, trusted: Path, var: Path) -> str:
    """The package's script with the node's paths moved into the test's directories."""
    for const, here in (("/usr/share/imgbase/images/n-2.0-1.squashfs", packed),
                        (str(trust.TRUSTED), trusted), (package.NODE_WORK, var)):
        assert const in script
        script = script.replace(const, str(here))
    return script


def run_postinst(script: str, tmp_path: Path, rc: int, *args: str) -> tuple[int, list[str], str]:
    calls = tmp_path / "calls"
    calls.write_text("")
    proc = subprocess.run(["sh", "-c", script, "postinst", *args], capture_output=True,
                          text=True, env={**os.environ, "IMGBASE_TEST_CALLS": str(calls),
                                          "IMGBASE_TEST_RC": str(rc),
                                          "PYTHONPATH": THIS_IMGBASE})
    return proc.returncode, calls.read_text().splitlines(), proc.stderr


def assert_ran_image_imgbase_on_a_private_copy(calls: list[str], var: Path) -> None:
    """One call: `update COPY`, by the imgbase unpacked from COPY, in a 0700 work directory
    under var that is gone afterwards."""
    assert len(calls) == 1, calls
    where, mode, verb, copy = calls[0].split(" ")
    work = Path(copy).parent
    assert verb == "update" and Path(copy).name == "n-2.0-1.squashfs"
    assert mode == "0o700"
    assert re.fullmatch(rf"{re.escape(str(var))}/package\.\w{{6}}", str(work)), work
    assert where == f"{work}/root/usr/lib/python3/dist-packages/imgbase"
    assert not work.exists()


def assignments(script: str) -> dict[str, str]:
    """NAME=VALUE lines of a script, each VALUE as the shell reads it back."""
    found = {}
    for line in script.splitlines():
        m = re.fullmatch(r"([a-z]+)=(\S.*)", line)
        if m and "$" not in m[2]:
            (word,) = shlex.split(m[2])
            assert m[2] == shlex.quote(word), line  # quoted, and nothing after it
            found[m[1]] = word
    return found


def test_deb_carries_the_image_and_updates_with_the_new_imgbase_once_verified(
        image: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    deb = package.build(str(image), "deb", tmp_path, keys["trusted"])
    assert deb.name == "n-image-update_2.0-1_amd64.deb"
    assert sorted(p.name for p in tmp_path.iterdir()) == [deb.name]  # no .package.* left
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Depends"],
                            capture_output=True, text=True, check=True).stdout
    assert "Package: n-image-update" in fields and "Version: 2.0-1" in fields
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    for suffix in ("", ".sha256", ".sha256.sig"):
        assert f"./usr/share/imgbase/images/n-2.0-1.squashfs{suffix}\n" in listing
    unpacked = tmp_path / "unpacked"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(unpacked)], check=True)
    packed = unpacked / "usr/share/imgbase/images/n-2.0-1.squashfs"
    assert packed.read_bytes() == image.read_bytes()
    text = (unpacked / "DEBIAN/postinst").read_text()
    subprocess.run(["sh", "-n", "-c", text], check=True)
    assert assignments(text) == {"image": "/usr/share/imgbase/images/n-2.0-1.squashfs",
                                 "trusted": "/etc/imgbase/trusted.d", "rc": "0"}
    assert f"python3 -P -c {shlex.quote(package.VERIFY)} " in text
    var = tmp_path / "var"
    script = node_script(text, packed, keys["trusted"], var)
    for rc in (0, 77):  # "up to date" counts as success
        code, calls, err = run_postinst(script, tmp_path, rc, "configure")
        assert code == 0, err
        assert_ran_image_imgbase_on_a_private_copy(calls, var)
    assert run_postinst(script, tmp_path, 2, "configure")[0] == 2  # a refusal fails it
    assert run_postinst(script, tmp_path, 0, "abort-upgrade")[:2] == (0, [])


def test_node_runs_nothing_of_an_image_its_imgbase_does_not_verify(
        image: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    deb = package.build(str(image), "deb", tmp_path, keys["trusted"])
    unpacked = tmp_path / "unpacked"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(unpacked)], check=True)
    packed = unpacked / "usr/share/imgbase/images/n-2.0-1.squashfs"
    text = (unpacked / "DEBIAN/postinst").read_text()
    untrusting = tmp_path / "other-trusted.d"  # a node that trusts another publisher
    untrusting.mkdir()
    with open(untrusting / "other.gpg", "wb") as f:
        subprocess.run(["gpg", "--homedir", str(keys["stranger"]), "--export"], check=True,
                       stdout=f)
    code, calls, err = run_postinst(node_script(text, packed, untrusting, tmp_path / "var"),
                                    tmp_path, 0, "configure")
    assert (code, calls) == (1, []), err
    assert "which is not in" in err
    # the image swapped after the package was installed: its checksum no longer holds
    packed.write_bytes(packed.read_bytes() + b"\0")
    code, calls, err = run_postinst(node_script(text, packed, keys["trusted"], tmp_path / "var"),
                                    tmp_path, 0, "configure")
    assert (code, calls) == (1, []), err
    assert "does not match" in err
    assert list((tmp_path / "var").iterdir()) == []  # the private copies are gone


def test_rpm_carries_the_image_and_the_same_script(image: Path, keys: dict[str, Path],
                                                    tmp_path: Path) -> None:
    rpm = package.build(str(image), "rpm", tmp_path, keys["trusted"])
    assert rpm.name == "n-image-update-2.0-1.x86_64.rpm"
    assert sorted(p.name for p in tmp_path.iterdir()) == [rpm.name]
    files = subprocess.run(["rpm", "-qpl", str(rpm)], capture_output=True, text=True,
                           check=True).stdout.split()
    assert files == [f"/usr/share/imgbase/images/n-2.0-1.squashfs{s}"
                     for s in ("", ".sha256", ".sha256.sig")]
    scripts = subprocess.run(["rpm", "-qp", "--scripts", str(rpm)], capture_output=True,
                             text=True, check=True).stdout
    assert "postinstall scriptlet (using /bin/sh):" in scripts
    requires = subprocess.run(["rpm", "-qp", "--requires", str(rpm)], capture_output=True,
                              text=True, check=True).stdout.split("\n")
    assert "imgbase" in requires
    post = scripts.split("postinstall scriptlet (using /bin/sh):\n", 1)[1]
    spec = package.PackageSpec(package.ImageId("n", "2.0", "1", "amd64"), ())
    assert post.rstrip("\n") == package.postinst(spec, deb=False).removeprefix(
        "#!/bin/sh\n").rstrip("\n")  # rpm kept it as written: no macro expanded in it
    subprocess.run(["sh", "-n", "-c", post], check=True)
    var = tmp_path / "var"
    code, calls, err = run_postinst(node_script(post, image, keys["trusted"], var), tmp_path, 77)
    assert code == 0, err
    assert_ran_image_imgbase_on_a_private_copy(calls, var)


def refused(image: Path, fmt: str, out: Path, trusted: Path, match: str) -> InputError:
    out.mkdir(exist_ok=True)
    with pytest.raises(InputError, match=match) as e:
        package.build(str(image), fmt, out, trusted)
    assert "\n" not in e.value.oneline()
    assert list(out.iterdir()) == []
    return e.value


EXPLOITS = [  # from issue 18: shell at install time, rpm macro at build time
    {**GOOD, "nvr": "n-1.0-1;touch${IFS}X;x"},
    {**GOOD, "release": "1%(touch X)", "nvr": "n-2.0-1%(touch X)"},
    {**GOOD, "version": "1.0;touch${IFS}X", "nvr": "n-1.0;touch${IFS}X-1"},
    {**GOOD, "name": "n\nPre-Depends: x", "nvr": "n\nPre-Depends: x-2.0-1"},
]


@pytest.mark.parametrize("fmt", package.FORMATS)
@pytest.mark.parametrize("info", EXPLOITS, ids=["nvr-shell", "release-macro", "version-shell",
                                               "name-newline"])
def test_a_signed_image_with_a_hostile_image_json_is_refused(
        info: dict[str, str], fmt: str, keys: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    image = make_image(tmp_path, json.dumps(info), keys["home"])
    monkeypatch.chdir(tmp_path)  # where `touch X` would land
    refused(image, fmt, tmp_path / "out", keys["trusted"],
            "cannot name a package|is not its name-version-release")
    assert not (tmp_path / "X").exists()


@pytest.mark.parametrize(("image_json", "match"), [
    ("[]", "image.json is list, not an object"),
    ('"n-2.0-1"', "image.json is str, not an object"),
    ("{", "image.json is not JSON"),
    ('{"name": "n", "version": "2.0", "release": "1"}', "has no architecture, nvr"),
    (json.dumps({**GOOD, "version": 2}), "has no version"),
])
def test_an_image_json_that_is_not_an_identity_is_refused(
        image_json: str, match: str, keys: dict[str, Path], tmp_path: Path) -> None:
    image = make_image(tmp_path, image_json, keys["home"])
    refused(image, "deb", tmp_path / "out", keys["trusted"], match)


def test_cli_refuses_an_empty_list_in_one_line_with_exit_2(keys: dict[str, Path],
                                                          tmp_path: Path) -> None:
    image = make_image(tmp_path, "[]", keys["home"])
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "imgbase", "package", str(image), "--format",
                           "deb", "-o", str(out), "--trusted", str(keys["trusted"])],
                          capture_output=True, text=True, cwd=THIS_IMGBASE)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "image.json is list, not an object" in proc.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("field", ["name", "version", "release", "architecture"])
@pytest.mark.parametrize("value", ["1%{x}", "1 2", "1'2", '1"2', "1$x", "1;x", "1\n2", "1-2",
                                   "", "9" * 65])
def test_every_field_is_checked_at_the_boundary(field: str, value: str) -> None:
    parts = {"name": "n", "version": "2.0", "release": "1", "architecture": "amd64",
             field: value}
    with pytest.raises(InputError, match=f"image.json's {field} .* cannot name a package|"
                       "not a name-version-release"):
        package.ImageId(**parts)


def test_an_image_not_verified_by_a_trusted_key_is_refused(keys: dict[str, Path],
                                                           tmp_path: Path) -> None:
    good = json.dumps(GOOD)
    unsigned = make_image(tmp_path, good, None, "unsigned.squashfs")
    refused(unsigned, "deb", tmp_path / "out", keys["trusted"], "is not signed: nodes would")
    junk_sig = make_image(tmp_path, good, None, "junk.squashfs")
    Path(f"{junk_sig}.sha256.sig").write_bytes(b"pretend signature")
    refused(junk_sig, "rpm", tmp_path / "out", keys["trusted"],
            r"junk\.squashfs is refused: the signature junk\.squashfs\.sha256\.sig ")
    stranger = make_image(tmp_path, good, keys["stranger"], "stranger.squashfs")
    refused(stranger, "deb", tmp_path / "out", keys["trusted"], "which is not in")
    tampered = make_image(tmp_path, good, keys["home"], "tampered.squashfs")
    tampered.write_bytes(tampered.read_bytes() + b"\0")
    refused(tampered, "deb", tmp_path / "out", keys["trusted"], "does not match")
    error = refused(make_image(tmp_path, good, keys["home"], "nokeys.squashfs"), "deb",
                    tmp_path / "out", tmp_path / "empty", "no trusted keys in ")
    assert "--trusted DIR" in (error.hint or "")


def test_bad_input_writes_nothing(image: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    refused(tmp_path / "nope.squashfs", "deb", out, keys["trusted"], "no such image")
    junk = tmp_path / "junk.squashfs"
    junk.write_bytes(b"not a squashfs")
    Path(f"{junk}.sha256").write_text(f"{sha256_file(str(junk))}  {junk.name}\n")
    trust.sign(str(junk), homedir=str(keys["home"]))
    refused(junk, "rpm", out, keys["trusted"], f"{junk} is not a readable squashfs")
    refused(image, "apk", out, keys["trusted"], "not a package format")
    odd = tmp_path / "odd dir"
    refused(image, "rpm", odd, keys["trusted"], "rpmbuild would build in a path")
