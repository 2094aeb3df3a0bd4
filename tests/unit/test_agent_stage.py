"""Finding 11: the agent and `imgbase update`'s answers. An image the node refused is not
downloaded again every pass; 77 ("already there") is not a failure; a failed download is
tried again later, not every pass. Against a real etcd and a real `imgbase` process (a
script on PATH that answers with the exit code under test)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgbase.agent import fleet
from imgbase.agent.core import STAGE_RETRY, Agent, StageRefused
from imgbase.agent.host import HostNode
from imgbase.errors import ImgbaseError
from imgbase.node.agentconfig import AgentConfig, Join
from tests.etcdcluster import EtcdCluster, etcd_cluster
from tests.unit.test_fleet import SimNode, group


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as c:
        yield c


def fake_imgbase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> Path:
    """An `imgbase` first on PATH that logs its arguments and exits with `code`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    script = bin_dir / "imgbase"
    script.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\necho 'imgbase: said {code}' >&2\n"
                      f"exit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_host_stage_reads_updates_exit_codes(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    url = "https://h/n-2.0-1.squashfs"
    fake_imgbase(tmp_path, monkeypatch, 77)
    HostNode().stage(url, "n-2.0-1")  # already there: no error
    log = fake_imgbase(tmp_path, monkeypatch, 65)
    with pytest.raises(StageRefused, match="refused"):
        HostNode().stage(url, "n-2.0-1")
    assert log.read_text().splitlines()[-1] == f"update --stage-only -- {url}"
    # 2: the network, a lock, a full disk, missing sidecars; 1: a failed step: tried again
    for code in (2, 1):
        fake_imgbase(tmp_path, monkeypatch, code)
        with pytest.raises(ImgbaseError) as e:
            HostNode().stage(url, "n-2.0-1")
        assert not isinstance(e.value, StageRefused)


class FailingStage(SimNode):
    def __init__(self, nvr: str, error: ImgbaseError) -> None:
        super().__init__(nvr)
        self.error, self.stages = error, 0

    def stage(self, url: str, nvr: str) -> None:
        self.stages += 1
        raise self.error


def test_a_refused_image_is_not_staged_again(cluster: EtcdCluster) -> None:
    g = group()
    node = FailingStage("n-1.0-1", StageRefused("imgbase update refused it: not signed"))
    with cluster.client() as admin, cluster.client() as client:
        fleet.set_image(admin, g, "n-2.0-1", "https://h/n-2.0-1.squashfs", 1)
        agent = Agent(AgentConfig(Join(tuple(cluster.endpoints), g, insecure_http=True)), "a",
                      node, client)
        agent.tick(0.0, roll=False)
        actions = [agent.tick(t * 60.0) for t in range(1, 200, 7)]  # hours of passes
        assert node.stages == 1 and actions[0] == "stage-failed"
        assert set(actions[1:]) == {"refused"} and agent.state == "registered"
        # a new record from the admin (the image re-signed) is tried again
        fleet.set_image(admin, g, "n-2.0-1", "https://h/n-2.0-1.squashfs", 1)
        assert agent.tick(13000.0) == "stage-failed" and node.stages == 2
        agent.leave()


def test_a_failed_download_is_retried_later_not_every_pass(cluster: EtcdCluster) -> None:
    g = group()
    node = FailingStage("n-1.0-1", ImgbaseError("imgbase update failed: connection reset"))
    with cluster.client() as admin, cluster.client() as client:
        fleet.set_image(admin, g, "n-2.0-1", "https://h/n-2.0-1.squashfs", 1)
        agent = Agent(AgentConfig(Join(tuple(cluster.endpoints), g, insecure_http=True)), "b",
                      node, client)
        agent.tick(0.0, roll=False)
        times = [t * 10.0 for t in range(1, 90)]  # a pass every 10 s for 15 min
        stages_at = []
        for t in times:
            before = node.stages
            agent.tick(t)
            if node.stages > before:
                stages_at.append(t)
        gaps = [b - a for a, b in zip(stages_at, stages_at[1:], strict=False)]
        assert len(stages_at) == 4  # at 10, 70, 190, 430 s: doubling from a minute
        assert gaps == [STAGE_RETRY, 2 * STAGE_RETRY, 4 * STAGE_RETRY]
        agent.leave()
