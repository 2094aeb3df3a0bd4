"""VM test harness: guests booted from the session's composed image.

Every guest is started through imgbase.vm (the API behind `imgbase vm`), gets
its own run directory under the test's tmp_path, is killed by pid at teardown,
and has the tail of its serial console attached to the report of a failing test.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from imgbase.run import run
from imgbase.vm import Guest, VmSpec
from tests.etcdcluster import EtcdCluster, etcd_cluster
from tests.vm import prepare

SERIAL_TAIL = 60


@pytest.fixture(scope="session")
def node_image(default_image: dict[str, object]) -> Path:
    return Path(str(default_image["squashfs"]))


def _boot(spec: VmSpec, rundir: Path, registry: list[Guest]) -> Guest:
    guest = Guest(spec, rundir=rundir)
    registry.append(guest)
    guest.start()
    guest.wait_ssh()
    return guest


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A module's cluster store: a real etcd on the host's 127.0.0.1, which guests reach as
    10.0.2.100 (qemu guestfwd; VmSpec.guestfwd) and nothing else."""
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def media_files(node_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v2 (signed), the v3 update package and the key (tests/vm/prepare.py)."""
    media: Path = prepare.build("media_files", lambda: prepare.build_media_files(
        node_image, tmp_path_factory.mktemp("media")))
    return media


@pytest.fixture(scope="session")
def lifecycle_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/e2e: v2 composed with a changed site layer, v3 that cannot boot, both signed
    (tests/vm/prepare.py, build_lifecycle_images); the directory to serve."""
    files: Path = prepare.build("lifecycle_images", lambda: prepare.build_lifecycle_images(
        tmp_path_factory.mktemp("lifecycle")))
    return files


@pytest.fixture(scope="session")
def media(media_files: Path) -> Path:
    """media_files as a squashfs, for a guest to mount as a disk."""
    out = media_files.parent / "media.squashfs"
    run(["mksquashfs", str(media_files), str(out), "-quiet", "-no-progress", "-noI", "-noD",
         "-noF", "-noX"])
    return out


@pytest.fixture(scope="session")
def installed_disks(node_image: Path, tmp_path_factory: pytest.TempPathFactory
                    ) -> dict[str, Path]:
    """"minimal", "nist" and "anaconda": installed in one live guest (tests/vm/prepare.py)."""
    disks: dict[str, Path] = prepare.build("installed_disks", lambda: (
        prepare.build_installed_disks(node_image, tmp_path_factory.mktemp("install"))))
    return disks


@pytest.fixture
def boot(request: pytest.FixtureRequest, tmp_path: Path
         ) -> Iterator[Callable[..., Guest]]:
    """boot(**VmSpec fields) -> a guest up on SSH; live-boots the node image by default."""
    guests: list[Guest] = []
    request.node._imgbase_guests = guests
    image = request.getfixturevalue("node_image")

    def factory(**fields: Any) -> Guest:
        if "disk" not in fields:
            fields.setdefault("live", image)
        return _boot(VmSpec(**fields), tmp_path / f"guest{len(guests)}", guests)

    yield factory
    for guest in guests:
        guest.stop()


@pytest.fixture(scope="module")
def live_guest(request: pytest.FixtureRequest, node_image: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """One live guest shared by a module's read-only assertions."""
    rundir = tmp_path_factory.mktemp("live-guest")
    attach = rundir / "attached.raw"
    attach.write_bytes(b"\0" * (64 << 20))
    guests: list[Guest] = []
    request.module._imgbase_guests = guests
    guest = _boot(VmSpec(live=node_image, blank=("1G",), attach=(attach,)), rundir / "run",
                  guests)
    yield guest
    guest.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        guests = getattr(item, "_imgbase_guests", []) + getattr(
            getattr(item, "module", None), "_imgbase_guests", [])
        for i, guest in enumerate(guests):
            report.sections.append(
                (f"guest {i} serial console (last {SERIAL_TAIL} lines, {guest.serial_log})",
                 guest.serial_tail(SERIAL_TAIL)))
