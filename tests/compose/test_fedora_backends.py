"""The Fedora-side backends for real: a compose through lorax or osbuild-composer.

This Debian machine has neither, so here each test is skipped with the backend's own
reason (``imgbase compose --list-backends`` prints the same). On a Fedora/RHEL machine
with the tool (and ``IMGBASE_FEDORA_REPO``, a baseurl of its release), they compose. The
contract tests (tests/compose/test_*_contract.py) are what runs here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imgbase.compose.backend import ComposerBackend
from tests.conftest import compose_json

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["lorax", "osbuild-composer"])
def test_a_real_compose(name: str, tmp_path: Path) -> None:
    reason = ComposerBackend.get(name).unavailable()
    if reason:
        pytest.skip(f"{name} cannot run here: {reason}")
    repo = os.environ.get("IMGBASE_FEDORA_REPO")
    if not repo:
        pytest.skip(f"{name} is here, but IMGBASE_FEDORA_REPO (a Fedora baseurl) is not set")
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers/core.toml").write_text('packages = ["bash", "coreutils"]\n')
    (tmp_path / "image.toml").write_text(
        '[image]\nname = "fedora-test"\nversion = "1"\nrelease = "1"\ndistro = "fedora"\n'
        f'suite = "40"\narchitecture = "amd64"\nbackend = "{name}"\nlayers = ["core"]\n'
        f'repos = ["{repo}"]\nunsigned = true\nbootable = false\n')
    result = compose_json(tmp_path / "image.toml", tmp_path / "out")
    manifest = json.loads(Path(str(result["manifest"])).read_text())
    assert {"bash", "coreutils"} <= {p["name"] for p in manifest["packages"]}
