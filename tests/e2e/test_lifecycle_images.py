"""The lifecycle test's v2, a real compose: the default image with its site layer changed.

It is composed after the session's v1 (tests/vm/prepare.py, in the background), so it is
where the package-tree cache is proven on a real compose. Here, not in tests/compose:
the images are built by the VM tests' session fixtures, and a compose test would wait for
them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import imgbase_cli
from tests.vm.prepare import E2E_MARK

pytestmark = [pytest.mark.slow]


def test_a_site_layer_change_reuses_the_package_tree(default_image: dict[str, object],
                                                     lifecycle_images: Path) -> None:
    """v2 of the lifecycle test: the default image with its site layer changed, composed
    after the session's v1 -- on v1's kept package tree (an overlay), not on
    packages installed again; and only the layer's files and the image's identity differ."""
    events = [json.loads(line) for line in
              (lifecycle_images.parent / "compose-v2.jsonl").read_text().splitlines()]
    packages = next(e for e in events if e["event"] == "step-done" and e["step"] == "packages")
    assert "reused" in packages["detail"] and packages["seconds"] < 30, packages
    v2 = lifecycle_images / "imgbase-node-1.1-1.squashfs"
    differing = json.loads(imgbase_cli("diff", "--json", str(default_image["squashfs"]),
                                       str(v2)).stdout)["differing"]
    assert f"/{E2E_MARK}" in differing
    others = [p for p in differing if not p.startswith(
        ("/etc/", "/usr/share/factory/etc/", "/usr/lib/imgbase/"))]
    assert others == [], differing
