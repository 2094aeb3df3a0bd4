"""The executor: steps run in order and are journaled; a journal left by an interrupted
operation blocks the next one until `imgbase recover`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgbase import plan as plan_module
from imgbase.errors import ImgbaseError, InputError
from imgbase.node import layers
from imgbase.plan import Plan, Step, execute, read_journal, write_atomic
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


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB file system (tmpfs): writes past it fail with ENOSPC."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tiny",
                           str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_write_onto_a_full_disk_fails_cleanly_and_is_journaled(
        tmp_path: Path, tiny_fs: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    target = tiny_fs / "grub/entries.cfg"
    target.parent.mkdir()
    target.write_text("old\n")
    plan = Plan("demo", (Step("ok", ("true",)),
                         Step("entries", write=(str(target), "x" * (256 << 10)))))
    with pytest.raises(ImgbaseError) as e:
        execute(plan, Progress(), journal)
    assert e.value.message == (f"demo: step 'entries' failed: cannot write {target}: "
                               "No space left on device")
    assert "\n" not in e.value.oneline()
    assert "free space" in (e.value.hint or "") and "imgbase recover" in (e.value.hint or "")
    assert sorted(p.name for p in target.parent.iterdir()) == ["entries.cfg"]  # no temp file
    assert target.read_text() == "old\n"
    assert read_journal(journal)[-1] == {**read_journal(journal)[-1], "event": "failed",
                                         "step": "entries", "error": f"cannot write {target}: "
                                         "No space left on device"}


def test_a_left_over_temporary_file_is_not_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("keep\n")
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/.grubenv.imgbase-tmp").symlink_to(outside)  # left by a crash, or planted
    write_atomic(tmp_path / "boot/grubenv", "new\n")
    assert outside.read_text() == "keep\n"
    assert (tmp_path / "boot/grubenv").read_text() == "new\n"
    assert sorted(p.name for p in (tmp_path / "boot").iterdir()) == ["grubenv"]


def test_the_journal_directory_is_fsynced_when_the_journal_comes_and_goes(
        tmp_path: Path) -> None:
    """Seen with strace: after the journal's creation and after its removal, an fsync of
    its directory (else a power cut can lose the record, or bring back a closed one)."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    jdir = tmp_path / "lib"
    script = ("import sys; from pathlib import Path; from imgbase.plan import *; "
              "from imgbase.progress import Progress; "
              "execute(Plan('demo', (Step('ok', ('true',)),)), Progress(), Path(sys.argv[1]))")
    proc = subprocess.run(["strace", "-f", "-y", "-qq", "-e", "trace=openat,fsync,unlink",
                           sys.executable, "-c", script, str(jdir / "journal.jsonl")],
                          capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = [line for line in proc.stderr.splitlines() if str(jdir) in line]
    created = next(i for i, c in enumerate(calls) if "O_CREAT" in c and "journal.jsonl" in c)
    removed = next(i for i, c in enumerate(calls) if c.lstrip().split("(")[0].endswith("unlink")
                   and "journal.jsonl" in c)
    dir_syncs = [i for i, c in enumerate(calls) if "fsync(" in c and f"<{jdir}>" in c]
    assert any(created < i < removed for i in dir_syncs), calls
    assert any(i > removed for i in dir_syncs), calls


def test_boot_space_is_measured_where_a_missing_directory_would_go(tiny_fs: Path) -> None:
    boot = tiny_fs / "boot"  # not there: the files would land on the file system above
    with pytest.raises(InputError, match=r"/boot is too full for another layer: 0 MiB free, "
                       r"64 MiB needed"):
        layers.check_boot_space(boot, "n-1-1+1")
    with pytest.raises(InputError, match="too full"):
        layers.check_boot_space(boot, None)


def test_boot_space_without_the_model_goes_by_the_largest_layer(tmp_path: Path) -> None:
    (tmp_path / "a+1").mkdir()
    (tmp_path / "a+1/vmlinuz").write_text("k")
    st = os.statvfs(tmp_path)
    with open(tmp_path / "a+1/initrd.img", "wb") as f:  # sparse, larger than the free space
        f.truncate(st.f_bavail * st.f_frsize + (1 << 30))
    for model in ("b+1", None):  # the model's directory is missing, or there is no model
        with pytest.raises(InputError, match="too full for another layer"):
            layers.check_boot_space(tmp_path, model)
