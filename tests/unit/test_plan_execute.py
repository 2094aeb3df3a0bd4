"""The executor: steps run in order and are journaled; a journal left by an interrupted
operation blocks the next one until `imgbase recover`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgbase import plan as plan_module
from imgbase.errors import ImgbaseError, InputError
from imgbase.plan import Plan, Step, execute, read_journal
from imgbase.progress import Progress


def test_steps_run_journaled_and_the_journal_goes_on_success(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    plan = Plan("demo", (Step("touch", ("touch", str(tmp_path / "a"))),
                         Step("write", write=(str(tmp_path / "b"), "hello\n"))),
                meta=(("layer", "n-1-1+1"),))
    execute(plan, Progress(), journal)
    assert (tmp_path / "a").exists() and (tmp_path / "b").read_text() == "hello\n"
    assert not journal.exists()


def test_a_failed_operation_blocks_the_next_until_recover(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = tmp_path / "journal.jsonl"
    monkeypatch.setattr(plan_module, "JOURNAL", journal)  # the node's journal
    failing = Plan("demo", (Step("ok", ("true",)), Step("bad", ("false",))),
                   meta=(("layer", "n-1-1+1"),))
    with pytest.raises(ImgbaseError, match="step 'bad' failed"):
        execute(failing, Progress(), journal)
    records = read_journal(journal)
    assert records[0] == {**records[0], "event": "begin", "operation": "demo",
                          "layer": "n-1-1+1"}
    assert [r["event"] for r in records[1:]] == ["start", "done", "start", "failed"]
    later = Plan("other", (Step("touch", ("touch", str(tmp_path / "c"))),))
    with pytest.raises(InputError, match=r"interrupted operation is on record \(demo, "
                       r"failed at step bad\)") as e:
        execute(later, Progress(), journal)
    assert e.value.hint == "run imgbase recover first"
    assert not (tmp_path / "c").exists()
    assert read_journal(journal) == records  # the record is kept as it was
    journal.write_text("")  # what recover's last step does (rm): then it runs
    execute(later, Progress(), journal)
    assert (tmp_path / "c").exists()
    assert json.loads(json.dumps(records))  # plain JSON lines


def test_install_and_layout_init_start_over_when_run_again(tmp_path: Path) -> None:
    journal = tmp_path / "install.journal"  # not the node's journal
    with pytest.raises(ImgbaseError):
        execute(Plan("install", (Step("bad", ("false",)),)), Progress(), journal)
    execute(Plan("install", (Step("ok", ("true",)),)), Progress(), journal)
    assert not journal.exists()
