"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imgbase_cli(*args: str, env: dict[str, str] | None = None, **kw: object
                ) -> subprocess.CompletedProcess[str]:
    """Run the imgbase CLI of this checkout in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "imgbase", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, **kw)  # type: ignore[call-overload]


@pytest.fixture
def root_dir() -> Path:
    return ROOT


def compose_json(image: str | Path, outdir: Path, *extra: str) -> dict[str, object]:
    """Compose with --json; return the final 'result' event (fails the test with stderr)."""
    import json

    proc = imgbase_cli("compose", str(image), "-o", str(outdir), "--json", *extra)
    if proc.returncode != 0:
        pytest.fail(f"compose failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout[-3000:]}")
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    result: dict[str, object] = events[-1]
    assert result["event"] == "result", events[-3:]
    return result


EARLY = pytest.StashKey[set[str]]()  # VM builds the selected tests want (tests/vm/prepare.py)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=run_order)


def pytest_collection_finish(session: pytest.Session) -> None:
    """What the selected tests (after -m/-k deselection) will want built early."""
    from tests.vm.prepare import WANTED

    session.config.stash[EARLY] = {name for item in session.items for name in
                                   getattr(item, "fixturenames", ()) if name in WANTED}


# Guests that boot only the composed image first, while the installer guest makes the
# disks in the background (tests/vm/prepare.py); the host tests next, so that the
# guests booting installed disks do not wait for it; the lifecycle test last, so that its
# images build in the background meanwhile.
IMAGE_ONLY_GUESTS = ("tests/vm/test_live.py", "tests/vm/test_vm_bad_input.py")


def run_order(item: pytest.Item) -> int:
    """compose 0, image-only guests 1, host tests 2, installed-disk guests 3, e2e 4."""
    path = str(item.path)
    if "/tests/e2e/" in path:
        return 4
    if path.endswith(IMAGE_ONLY_GUESTS):
        return 1
    if "/tests/vm/" in path:
        return 3
    return 0 if "/tests/compose/" in path else 2


@pytest.fixture(scope="session")
def default_image(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The default node image, composed once per session (reused from the cache).

    Once it exists, the installed disks and update media the selected VM tests want start
    building in the background (tests/vm/prepare.py), while the other tests run.
    """
    result = compose_json(ROOT / "images/node.toml", tmp_path_factory.mktemp("image"))
    want = request.config.stash.get(EARLY, set())
    if want:
        from tests.vm.prepare import start_early

        start_early(Path(str(result["squashfs"])), want, tmp_path_factory.mktemp)
    return result


@pytest.fixture(scope="session")
def image_tree(default_image: dict[str, object],
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default image unpacked into a directory, for chroot inspection."""
    tree = tmp_path_factory.mktemp("tree") / "root"
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(tree), str(default_image["squashfs"])],
                   check=True)
    return tree


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Contract tests (against fakes of lorax and osbuild-composer) are counted apart, so
    that no one reads them as integration tests of those backends."""
    counts: dict[str, int] = {}
    for outcome in ("passed", "failed", "skipped", "xfailed"):
        for report in terminalreporter.stats.get(outcome, []):
            if "contract" in getattr(report, "keywords", {}) and report.when in (
                    "call", "setup") and (outcome != "passed" or report.when == "call"):
                counts[outcome] = counts.get(outcome, 0) + 1
    if counts:
        terminalreporter.write_sep("-", "contract tests (against fakes; not integration)")
        terminalreporter.write_line(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    # the time of each phase of tests/e2e/test_lifecycle.py, when it ran (found by name:
    # pytest imports test modules under names of its own)
    for module in list(sys.modules.values()):
        phases = getattr(module, "LIFECYCLE_PHASES", None)
        if phases:
            terminalreporter.write_sep("-", "lifecycle phases (tests/e2e/test_lifecycle.py)")
            for name, seconds in phases:
                terminalreporter.write_line(f"{seconds:7.1f} s  {name}")
            break
