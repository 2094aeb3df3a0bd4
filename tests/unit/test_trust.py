"""Image trust with real OpenPGP keys: gpg signs, gpgv checks against trusted.d only."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgbase import trust
from imgbase.errors import InputError
from tests.images import stop_agent


def gen_key(home: Path, uid: str) -> str:
    home.mkdir(mode=0o700)
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--passphrase", "",
                    "--quick-gen-key", uid, "ed25519", "sign", "never"],
                   check=True, capture_output=True)
    out = subprocess.run(["gpg", "--homedir", str(home), "--with-colons", "--list-keys"],
                         check=True, capture_output=True, text=True).stdout
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("keys")
    publisher = gen_key(root / "publisher", "imgbase test publisher <pub@example.org>")
    gen_key(root / "stranger", "someone else <else@example.org>")
    trusted = root / "trusted.d"
    trusted.mkdir()
    with open(trusted / "publisher.gpg", "wb") as f:
        subprocess.run(["gpg", "--homedir", str(root / "publisher"), "--export", publisher],
                       check=True, stdout=f)
    yield {"home": root / "publisher", "fpr": publisher, "stranger": root / "stranger",
           "trusted": trusted}
    for home in ("publisher", "stranger"):
        stop_agent(root / home)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    image = tmp_path / "n-2.0-1.squashfs"
    image.write_bytes(b"pretend squashfs " * 1000)
    Path(f"{image}.sha256").write_text(f"{trust.sha256_of(str(image))}  {image.name}\n")
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
    Path(f"{image}.sha256").write_text(f"{trust.sha256_of(str(image))}  {image.name}\n")
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

    monkeypatch.setattr(trust, "sha256_of", hashing)
    with pytest.raises(InputError, match="is not signed"):
        trust.verify_image(str(image), insecure=False, trusted=keys["trusted"])
    monkeypatch.undo()
    trust.sign(str(image), homedir=str(keys["home"]))
    monkeypatch.setattr(trust, "sha256_of", hashing)
    with pytest.raises(InputError, match="no trusted keys in"):
        trust.verify_image(str(image), insecure=False, trusted=tmp_path / "empty.d")
