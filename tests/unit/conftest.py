"""Fixtures of the unit tests: OpenPGP keys made with the real gpg."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

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
