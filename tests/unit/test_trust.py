"""Image trust with real OpenPGP keys: gpg signs, gpgv checks against trusted.d only."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from imgbase.errors import ImageRefused, InputError
from imgbase.image import trust
from imgbase.image.naming import Nvr
from imgbase.image.squashfs import sha256_file
from imgbase.plan import write_atomic
from tests.conftest import imgbase_cli
from tests.unit.test_node_plans import node


@pytest.fixture
def image(tmp_path: Path) -> Path:
    image = tmp_path / "n-2.0-1.squashfs"
    image.write_bytes(b"pretend squashfs " * 1000)
    Path(f"{image}.sha256").write_text(f"{sha256_file(str(image))}  {image.name}\n")
    return image


def test_signed_image_is_accepted_and_names_its_key(keys: dict, image: Path) -> None:
    sig = trust.sign(str(image), homedir=str(keys["home"]))
    assert sig == Path(f"{image}.sha256.sig")
    verdict = trust.verify_image(str(image), insecure=False, trusted=keys["trusted"])
    assert verdict == trust.Verdict("verified", f"signed by {keys['fpr']}")


def test_unsigned_image_is_refused_unless_insecure(keys: dict, image: Path) -> None:
    with pytest.raises(InputError, match=r"is not signed \(.*\.sha256\.sig is missing\)") as e:
        trust.verify_image(str(image), insecure=False, trusted=keys["trusted"])
    assert "--insecure" in (e.value.hint or "")
    assert trust.verify_image(str(image), insecure=True, trusted=keys["trusted"]) == \
        trust.Verdict("verified", "missing (--insecure)")


def test_tampered_checksum_file_fails_its_signature_even_when_insecure(
        keys: dict, image: Path) -> None:
    trust.sign(str(image), homedir=str(keys["home"]))
    image.write_bytes(b"something else")  # and a matching, but unsigned, checksum
    Path(f"{image}.sha256").write_text(f"{sha256_file(str(image))}  {image.name}\n")
    for insecure in (False, True):
        with pytest.raises(InputError, match="is BAD"):
            trust.verify_image(str(image), insecure=insecure, trusted=keys["trusted"])


def test_key_not_in_trusted_d_is_refused(keys: dict, image: Path) -> None:
    trust.sign(str(image), homedir=str(keys["stranger"]))
    with pytest.raises(InputError, match="which is not in .*trusted.d"):
        trust.verify_image(str(image), insecure=False, trusted=keys["trusted"])


def test_no_trusted_keys_at_all_is_refused_with_a_hint(keys: dict, image: Path,
                                                       tmp_path: Path) -> None:
    trust.sign(str(image), homedir=str(keys["home"]))
    with pytest.raises(InputError, match="no trusted keys in") as e:
        trust.verify_image(str(image), insecure=False, trusted=tmp_path / "empty.d")
    assert "gpg --export" in (e.value.hint or "")


def test_checksum_mismatch_and_missing_sums(keys: dict, image: Path) -> None:
    Path(f"{image}.sha256").write_text("0" * 64 + f"  {image.name}\n")
    with pytest.raises(InputError, match="does not match"):
        trust.verify_image(str(image), insecure=True, trusted=keys["trusted"])
    Path(f"{image}.sha256").unlink()
    with pytest.raises(InputError, match="is missing: the image cannot be verified"):
        trust.verify_image(str(image), insecure=False, trusted=keys["trusted"])
    assert trust.verify_image(str(image), insecure=True).checksum == "missing (--insecure)"


def test_sign_refuses_a_stale_checksum(keys: dict, image: Path) -> None:
    image.write_bytes(b"changed after compose")
    with pytest.raises(InputError, match="does not match"):
        trust.sign(str(image), homedir=str(keys["home"]))
    assert not Path(f"{image}.sha256.sig").exists()


def test_an_unsigned_or_untrusted_image_is_refused_before_it_is_read(
        keys: dict, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def hashing(path: str) -> str:
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(trust, "sha256_file", hashing)
    with pytest.raises(InputError, match="is not signed"):
        trust.verify_image(str(image), insecure=False, trusted=keys["trusted"])
    monkeypatch.undo()
    trust.sign(str(image), homedir=str(keys["home"]))
    monkeypatch.setattr(trust, "sha256_file", hashing)
    with pytest.raises(InputError, match="no trusted keys in"):
        trust.verify_image(str(image), insecure=False, trusted=tmp_path / "empty.d")


# -- the verified copy: what update, install and base --add use -------------------------

def squashfs(path: Path, nvr: str, filler: str = "") -> Path:
    """A real (tiny) imgbase image: a squashfs with usr/lib/imgbase/image.json."""
    tree = path.with_suffix(".tree")
    (tree / "usr/lib/imgbase").mkdir(parents=True)
    (tree / "usr/lib/imgbase/image.json").write_text(json.dumps(
        {"nvr": nvr, "kernel_args": ["console=ttyS0"]}))
    (tree / "etc").mkdir()
    (tree / "etc/filler").write_text(filler or nvr)
    subprocess.run(["mksquashfs", str(tree), str(path), "-quiet", "-no-progress",
                    "-noappend"], check=True)
    Path(f"{path}.sha256").write_text(f"{sha256_file(str(path))}  {path.name}\n")
    return path


@pytest.fixture
def real(tmp_path: Path) -> Path:
    return squashfs(tmp_path / "src/n-2.0-1.squashfs", "n-2.0-1")


def allow(tmp_path: Path, value: str = "true") -> Path:
    conf = tmp_path / "imgbase.toml"
    conf.write_text(f"[trust]\nallow_insecure = {value}\n")
    return conf


def test_a_signed_image_is_copied_into_a_root_only_dir_and_read_from_there(
        keys: dict, real: Path, tmp_path: Path) -> None:
    trust.sign(str(real), homedir=str(keys["home"]))
    dest = tmp_path / "images"
    got = trust.verified_copy(str(real), insecure=False, trusted=keys["trusted"],
                              dest_dir=dest, config=tmp_path / "none.toml")
    assert (got.nvr, got.key, got.checksum) == ("n-2.0-1", keys["fpr"], "verified")
    assert got.kernel_args == ("console=ttyS0",)
    assert got.path.parent == dest and got.path != real
    assert got.path.read_bytes() == real.read_bytes()
    assert dest.stat().st_mode & 0o777 == 0o700
    assert got.verdict == trust.Verdict("verified", f"signed by {keys['fpr']}")
    got.discard()
    assert list(dest.iterdir()) == []


def test_an_image_swapped_after_the_check_changes_nothing(
        keys: dict, real: Path, tmp_path: Path) -> None:
    """The attacker who can write the image's directory swaps the file once it is
    verified: what the update then reads is the verified copy, not the path."""
    from imgbase.image import info
    from imgbase.node import update

    trust.sign(str(real), homedir=str(keys["home"]))
    signed = real.read_bytes()
    got = trust.verified_copy(str(real), insecure=False, trusted=keys["trusted"],
                              dest_dir=tmp_path / "images", config=tmp_path / "none.toml")
    evil = squashfs(tmp_path / "evil/n-9.0-1.squashfs", "n-9.0-1", "evil")
    os.replace(evil, real)
    assert info.image_info(str(got.path))["nvr"] == "n-2.0-1"
    assert got.path.read_bytes() == signed
    plan = update.plan_update(update.UpdateFacts(
        node=node(), image=str(got.path), nvr=got.nvr, image_kargs=got.kernel_args,
        origin="n-1.0-1", fstab="", key=got.key))
    sync = next(s for s in plan.steps if s.name == "base-sync").argv
    assert sync is not None and str(got.path) in sync and str(real) not in sync


def test_a_copy_that_does_not_match_is_removed_and_refused(
        keys: dict, real: Path, tmp_path: Path) -> None:
    trust.sign(str(real), homedir=str(keys["home"]))
    squashfs(tmp_path / "other/n-2.0-1.squashfs", "n-2.0-1", "other bytes")
    os.replace(tmp_path / "other/n-2.0-1.squashfs", real)  # signed sums, other image
    dest = tmp_path / "images"
    with pytest.raises(InputError, match="does not match"):
        trust.verified_copy(str(real), insecure=False, trusted=keys["trusted"],
                            dest_dir=dest, config=tmp_path / "none.toml")
    assert list(dest.iterdir()) == []


def test_a_finished_download_is_taken_not_copied_and_gone_once_used(
        keys: dict, real: Path, tmp_path: Path) -> None:
    """Finding 11: finished downloads were never collected. A download (in the root-only
    downloads dir) becomes the verified copy by rename; once the update is done with it,
    nothing of the image is left on /var -- and a download that does not match is removed."""
    downloads = real.parent
    trust.sign(str(real), homedir=str(keys["home"]))
    signed = real.read_bytes()
    dest = tmp_path / "images"
    got = trust.verified_copy(str(real), insecure=False, trusted=keys["trusted"],
                              dest_dir=dest, config=tmp_path / "none.toml", adopt=downloads)
    assert not real.exists() and got.path.parent == dest and got.path.read_bytes() == signed
    got.discard()
    assert list(dest.iterdir()) == [] and not real.exists()
    squashfs(tmp_path / "other/n-2.0-1.squashfs", "n-2.0-1", "other bytes")
    os.replace(tmp_path / "other/n-2.0-1.squashfs", real)  # the old .sha256 and .sig stay
    with pytest.raises(InputError, match="does not match"):
        trust.verified_copy(str(real), insecure=False, trusted=keys["trusted"],
                            dest_dir=dest, config=tmp_path / "none.toml", adopt=downloads)
    assert list(dest.iterdir()) == [] and not real.exists()


@pytest.mark.parametrize("kargs", ['"quiet splash"', '["quiet", "x=}"]', '["$(reboot)"]'])
def test_an_image_whose_kernel_args_grub_could_misread_is_refused(
        keys: dict, tmp_path: Path, kargs: str) -> None:
    """Finding 4: update never checked an image's kernel_args; the verified image's are
    checked by the one gate (a string is not split into letters)."""
    img = squashfs(tmp_path / "src/n-2.0-1.squashfs", "n-2.0-1")
    tree = img.with_suffix(".tree")
    (tree / "usr/lib/imgbase/image.json").write_text(
        f'{{"nvr": "n-2.0-1", "kernel_args": {kargs}}}')
    subprocess.run(["mksquashfs", str(tree), str(img), "-quiet", "-no-progress",
                    "-noappend"], check=True)
    Path(f"{img}.sha256").write_text(f"{sha256_file(str(img))}  {img.name}\n")
    trust.sign(str(img), homedir=str(keys["home"]))
    dest = tmp_path / "images"
    with pytest.raises(InputError, match="kernel_args|kernel argument"):
        trust.verified_copy(str(img), insecure=False, trusted=keys["trusted"],
                            dest_dir=dest, config=tmp_path / "none.toml")
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("image_json, match", [
    ('[]', "its image.json has no nvr"),
    ('{"kernel_args": []}', "its image.json has no nvr"),
    ('{"nvr": "n-2.0-1", "kernel_args": "quiet"', "is not JSON"),
    ('{"nvr": "n-2.0~rc1-1"}', "cannot name an LVM volume"),
    ('{"nvr": "n-' + "1" * 70 + '-1"}', "more than 64"),
])
def test_a_signed_image_json_that_is_no_identity_is_refused_with_65(
        keys: dict, tmp_path: Path, image_json: str, match: str) -> None:
    """Brief: the image is hostile until verified -- and a signed one is still checked
    before its NVR names an LVM volume. These are the image's own fault: exit 65, which
    the agent does not retry."""
    img = squashfs(tmp_path / "src/n-2.0-1.squashfs", "n-2.0-1")
    tree = img.with_suffix(".tree")
    (tree / "usr/lib/imgbase/image.json").write_text(image_json)
    subprocess.run(["mksquashfs", str(tree), str(img), "-quiet", "-no-progress",
                    "-noappend"], check=True)
    Path(f"{img}.sha256").write_text(f"{sha256_file(str(img))}  {img.name}\n")
    trust.sign(str(img), homedir=str(keys["home"]))
    dest = tmp_path / "images"
    with pytest.raises(ImageRefused, match=match) as e:
        trust.verified_copy(str(img), insecure=False, trusted=keys["trusted"],
                            dest_dir=dest, config=tmp_path / "none.toml")
    assert e.value.exit_code == 65
    assert list(dest.iterdir()) == []


def test_refusals_of_the_image_exit_65_and_the_rest_2(keys: dict, real: Path,
                                                       tmp_path: Path) -> None:
    """The agent's retry rule rests on this split: what the image is (65) against what
    may pass on another try (2)."""
    trust.sign(str(real), homedir=str(keys["home"]))
    kw = {"insecure": False, "trusted": keys["trusted"], "dest_dir": tmp_path / "images",
          "config": tmp_path / "none.toml"}
    with pytest.raises(ImageRefused, match="older than"):
        trust.refuse_rollback(Nvr.parse("n-1.0-1"), {"n": "n-2.0-1"}, allow_downgrade=False)
    stranger = tmp_path / "stranger-trusted"
    stranger.mkdir()
    with open(stranger / "s.gpg", "wb") as f:
        subprocess.run(["gpg", "--homedir", str(keys["stranger"]), "--export"], check=True,
                       stdout=f)
    with pytest.raises(ImageRefused, match="which is not in"):
        trust.verified_copy(str(real), **{**kw, "trusted": stranger})
    Path(f"{real}.sha256.sig").unlink()
    with pytest.raises(InputError, match="is not signed") as e:
        trust.verified_copy(str(real), **kw)
    assert not isinstance(e.value, ImageRefused)  # perhaps still being uploaded


def test_nothing_parses_an_image_before_its_signature_is_good(
        keys: dict, real: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgbase.image import info

    def parsing(*args: object, **kw: object) -> None:
        raise AssertionError("the image was parsed before it was verified")

    monkeypatch.setattr(info, "image_info", parsing)
    dest = tmp_path / "images"
    with pytest.raises(InputError, match="is not signed"):
        trust.verified_copy(str(real), insecure=False, trusted=keys["trusted"],
                            dest_dir=dest, config=tmp_path / "none.toml")
    trust.sign(str(real), homedir=str(keys["stranger"]))
    with pytest.raises(InputError, match="which is not in"):
        trust.verified_copy(str(real), insecure=False, trusted=keys["trusted"],
                            dest_dir=dest, config=tmp_path / "none.toml")
    assert not dest.exists()  # not even copied


def test_insecure_needs_allow_insecure_in_imgbase_toml(
        keys: dict, real: Path, tmp_path: Path) -> None:
    dest = tmp_path / "images"
    for conf in (tmp_path / "none.toml", allow(tmp_path, "false")):
        with pytest.raises(InputError, match="--insecure is not allowed on this node"):
            trust.verified_copy(str(real), insecure=True, trusted=keys["trusted"],
                                dest_dir=dest, config=conf)
    got = trust.verified_copy(str(real), insecure=True, trusted=keys["trusted"],
                              dest_dir=dest, config=allow(tmp_path))
    assert (got.nvr, got.key, got.checksum) == ("n-2.0-1", None, "verified")
    assert got.verdict.signature == "missing (--insecure)"


@pytest.mark.parametrize(("text", "message"), [
    ("[trust]\nallow_insecure = 1\n", r"allow_insecure = 1 is not true or false"),
    ("[trust]\nallow_unsigned = true\n", r"unknown key 'allow_unsigned' in \[trust\]"),
    ("trust = 3\n", r"\[trust\] must be a table"),
    ("[trust\n", "imgbase.toml:1: TOML syntax error"),
])
def test_a_bad_trust_config_is_one_line_naming_the_file(tmp_path: Path, text: str,
                                                        message: str) -> None:
    conf = tmp_path / "imgbase.toml"
    conf.write_text(text)
    with pytest.raises(InputError, match=message) as e:
        trust.check_insecure(True, conf)
    assert str(conf) in e.value.message


def test_update_insecure_is_refused_by_the_cli_without_the_setting(tmp_path: Path) -> None:
    proc = imgbase_cli("update", "--insecure", str(tmp_path / "x.squashfs"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--insecure is not allowed on this node" in proc.stderr


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_sign_refuses_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    image = tmp_path / "n.squashfs"
    if kind == "fifo":
        os.mkfifo(image)
    else:
        image.mkdir()
    Path(f"{image}.sha256").write_text("0" * 64 + "  n.squashfs\n")
    proc = imgbase_cli("sign", str(image), timeout=30)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{image} is not a regular file" in proc.stderr


def test_sidecars_that_are_fifos_are_refused_without_hanging(tmp_path: Path, real: Path,
                                                             keys: dict) -> None:
    os.mkfifo(f"{real}.sha256.sig")
    with pytest.raises(InputError, match=r"\.sig is not a regular file"):
        trust.verified_copy(str(real), insecure=False, trusted=keys["trusted"],
                            dest_dir=tmp_path / "images", config=tmp_path / "none.toml")


# -- anti-rollback ----------------------------------------------------------------------

def test_an_image_older_than_the_newest_ever_accepted_is_refused(tmp_path: Path) -> None:
    record = tmp_path / "accepted.json"
    step = trust.accepted_step({}, Nvr.parse("n-3.0-1"), record)
    assert step.write is not None
    write_atomic(Path(step.write[0]), step.write[1])  # as the plan's step writes it
    accepted = trust.read_accepted(record)
    assert accepted == {"n": "n-3.0-1"}
    # the bases of 3.0 may be gone (gc): the record still says 3.0 was accepted
    with pytest.raises(InputError, match="n-2.0-1 is older than n-3.0-1, the newest image"):
        trust.refuse_rollback(Nvr.parse("n-2.0-1"), accepted, allow_downgrade=False)
    trust.refuse_rollback(Nvr.parse("n-2.0-1"), accepted, allow_downgrade=True)
    trust.refuse_rollback(Nvr.parse("n-3.1-1"), accepted, allow_downgrade=False)
    trust.refuse_rollback(Nvr.parse("other-1-1"), accepted, allow_downgrade=False)
    # a downgrade allowed never lowers the record; a newer image raises it
    low = trust.accepted_step(accepted, Nvr.parse("n-2.0-1"), record).write
    high = trust.accepted_step(accepted, Nvr.parse("n-3.1-1"), record).write
    assert low is not None and json.loads(low[1]) == {"n": "n-3.0-1"}
    assert high is not None and json.loads(high[1]) == {"n": "n-3.1-1"}
    record.write_text("[]")
    with pytest.raises(InputError, match="is not the record of accepted images"):
        trust.read_accepted(record)


def test_update_refuses_below_the_record_even_with_no_newer_base(
        tmp_path: Path, real: Path, keys: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgbase.node import update
    from imgbase.node.facts import NodeFacts

    trust.sign(str(real), homedir=str(keys["home"]))
    got = trust.verified_copy(str(real), insecure=False, trusted=keys["trusted"],
                              dest_dir=tmp_path / "images", config=tmp_path / "none.toml")
    record = tmp_path / "accepted.json"
    record.write_text(json.dumps({"n": "n-5.0-1"}))
    monkeypatch.setattr(trust, "ACCEPTED", record)
    monkeypatch.setattr(NodeFacts, "gather", classmethod(lambda cls: node()))
    with pytest.raises(InputError, match="older than n-5.0-1, the newest image this node"):
        update.gather_facts(got, allow_downgrade=False, tries=3)
    record.write_text(json.dumps({"n": "n-1.0-1"}))
    facts = update.gather_facts(got, allow_downgrade=False, tries=3)
    assert (facts.image, facts.nvr, facts.key) == (str(got.path), "n-2.0-1", keys["fpr"])
    plan = update.plan_update(facts)
    names = [s.name for s in plan.steps]
    assert names.index("base-key") < names.index("base-complete")
    assert names.index("layer-complete") < names.index("accepted") < names.index("boot-default")
    write = plan.steps[names.index("accepted")].write
    assert write is not None and write[0] == str(record)
    assert json.loads(write[1]) == {"n": "n-2.0-1"}


def test_copies_left_by_a_process_that_is_gone_are_removed(keys: dict, real: Path,
                                                           tmp_path: Path) -> None:
    dest = tmp_path / "images"
    dest.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = dest / f".{dead.pid}.n-1.0-1.squashfs.abc123"
    left.write_bytes(b"a copy an update cut short left")
    mine = dest / f".{os.getpid()}.n-1.0-1.squashfs.def456"
    mine.write_bytes(b"a copy in use")
    trust.sign(str(real), homedir=str(keys["home"]))
    got = trust.verified_copy(str(real), insecure=False, trusted=keys["trusted"],
                              dest_dir=dest, config=tmp_path / "none.toml")
    assert not left.exists() and mine.exists() and got.path.exists()


def test_a_missing_image_is_named_as_such(keys: dict, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nothere.squashfs: no such image"):
        trust.verified_copy(str(tmp_path / "nothere.squashfs"), insecure=False,
                            trusted=keys["trusted"], dest_dir=tmp_path / "images",
                            config=tmp_path / "none.toml")


def test_base_add_records_the_image_it_verified_not_the_name_given() -> None:
    """`base --add IMAGE --nvr NAME` names the base; the anti-rollback record is raised to
    the image's own NVR (a made-up --nvr n-99-1 would have blocked every later update),
    and the name must be one LVM takes."""
    from imgbase.node import layers

    plan = layers.plan_base_add(node(), "/var/lib/imgbase/images/x", "n-99-1", "1G", None,
                               {"n": "n-1.0-1"}, "n-2.0-1")
    record = next(s for s in plan.steps if s.name == "accepted").write
    assert record is not None and json.loads(record[1]) == {"n": "n-2.0-1"}
    with pytest.raises(InputError, match="cannot name an LVM volume"):
        layers.plan_base_add(node(), "/x", "n-2.0~rc1-1", "1G", None, {}, "n-2.0-1")
