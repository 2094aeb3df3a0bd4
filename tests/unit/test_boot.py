"""Boot selection, kernel arguments and health: pure decisions, tested on the host.

The same behaviour in a guest booting its own disk: tests/vm/test_node.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from imgbase import config
from imgbase.bootloader import grub, grubenv
from imgbase.errors import InputError
from imgbase.image import kargs
from imgbase.node import boot, health, keep, rollback, update
from imgbase.node.status import collect
from tests.unit.test_node_plans import NVR, lv, node

A, B = f"{NVR}+1", f"{NVR}+2"


def two_layers(**env: str):  # type: ignore[no-untyped-def]
    f = node(lv(B, origin=NVR, tags="imgbase:layer"), entries=(A, B))
    return replace(f, env={"saved_entry": A, **env})


def written_env(plan) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The one grubenv write of a plan, which then commits /boot for GRUB."""
    step, commit = plan.steps
    assert commit.name == "boot-commit" and "fsfreeze --freeze" in commit.argv[2]
    assert step.write[0] == "/boot/grub/grubenv" and len(step.write[1]) == 1024
    return grubenv.parse(step.write[1])


def test_next_boot_sets_next_entry_and_keeps_the_default() -> None:
    assert written_env(boot.plan_next(two_layers(), B)) == {"saved_entry": A, "next_entry": B}


def test_set_default_puts_the_layer_on_trial_with_the_booted_one_as_fallback() -> None:
    env = written_env(boot.plan_set_default(two_layers(), B, tries=2))
    assert env == {"saved_entry": B, "imgbase_tries": "2", "imgbase_fallback": A}
    assert written_env(boot.plan_set_default(two_layers(), B, tries=None)) == {"saved_entry": B}


def test_set_default_from_a_layer_on_trial_falls_back_to_the_old_default() -> None:
    f = replace(two_layers(imgbase_tries="1", imgbase_fallback="x"), booted=B,
                env={"saved_entry": A, "imgbase_tries": "1"})
    assert written_env(boot.plan_set_default(f, B, 3))["imgbase_fallback"] == A


def test_menu_timeout_is_a_grubenv_variable_that_grub_cfg_reads() -> None:
    env = written_env(boot.plan_menu_timeout(two_layers(next_entry=B), 0))
    assert env == {"saved_entry": A, "next_entry": B, "imgbase_timeout": "0"}  # rest kept
    cfg = grub.grub_cfg(A)
    # read after load_env, before any entry boots; without it grub.cfg's 2 s stand
    assert cfg.index("load_env") < cfg.index('set timeout="${imgbase_timeout}"')
    assert "set timeout=2\n" in cfg


def test_an_update_keeps_the_menu_timeout() -> None:
    from tests.unit.test_update_plan import FACTS
    facts = replace(FACTS, node=replace(FACTS.node, env={**FACTS.node.env,
                                                        "imgbase_timeout": "0"}))
    last = update.plan_update(facts).steps[-2]
    assert last.name == "boot-default"
    assert grubenv.parse(last.write[1])["imgbase_timeout"] == "0"


@pytest.mark.parametrize(("call", "message"), [
    (lambda f: boot.plan_menu_timeout(f, -1), "menu timeout -1 is out of range"),
    (lambda f: boot.plan_menu_timeout(f, 301), "menu timeout 301 is out of range"),
    (lambda f: boot.plan_next(f, "n-1.0-1+7"), "is not a layer of this node"),
    (lambda f: boot.plan_set_default(f, B, 0), "--tries 0 is out of range"),
    (lambda f: boot.plan_set_default(replace(f, entries={A: f.entries[A]}), B),
     "has no boot entry"),
])
def test_boot_refuses(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=message):
        call(two_layers())


def test_assess_records_why_a_fallen_back_layer_was_abandoned() -> None:
    history = [{"event": "health", "layer": B, "good": False, "reason": "libvirt: down"}]
    env = {"saved_entry": B, "imgbase_tries": "0", "imgbase_fallback": A}
    a = boot.assess(env, A, True, "ok", history)
    assert a.env == {"saved_entry": A} and not a.reboot
    assert a.events == [{"event": "abandoned", "layer": B, "fallback": A,
                         "reason": "unhealthy: libvirt: down"}]


def test_assess_leaves_a_one_time_boot_alone() -> None:
    env = {"saved_entry": A}
    assert boot.assess(env, B, False, "x", []) == boot.Assessment(env, [], False)


def test_grubenv_refuses_what_grub_could_not_store() -> None:
    with pytest.raises(InputError, match="over 1024"):
        grubenv.render({"k": "v" * 1100})
    with pytest.raises(InputError, match="cannot be stored"):
        grubenv.render({"k": "a\nb"})


@pytest.mark.parametrize("arg", ["a\nb", 'x"y', "$(reboot)", "a b", "x{", "c\\d", ""])
def test_unsafe_kargs_are_refused(arg: str) -> None:
    with pytest.raises(InputError):
        kargs.edit(["rw"], append=[arg])


def test_health_runs_directory_checks_with_a_timeout(tmp_path: Path) -> None:
    req = tmp_path / "required"
    req.mkdir()
    (req / "fails").write_text("#!/bin/sh\necho first\necho 'the reason' >&2\nexit 3\n")
    (req / "hangs").write_text("#!/bin/sh\nsleep 30\n")
    (req / "not-executable").write_text("#!/bin/sh\nexit 1\n")
    for name in ("fails", "hangs"):
        os.chmod(req / name, 0o755)
    found = health.directory_checks(tmp_path)
    assert [n for n, _, _ in found] == ["required/fails", "required/hangs"]
    results = [health.run_command(n, t, argv, 1.0) for n, t, argv in found]
    assert [(r.ok, r.reason) for r in results] == [(False, "the reason"),
                                                   (False, "timed out after 1 s")]
    assert health.verdict(results)[0] is False


def test_health_config_is_validated(tmp_path: Path) -> None:
    conf = tmp_path / "imgbase.toml"
    conf.write_text('[health]\ntimeout = 5\nrequired_units = ["a.service"]\n')
    assert config.load(conf).health == config.HealthSettings(5.0, ("a.service",))
    conf.write_text("[health]\ntimeout = -1\n")
    with pytest.raises(InputError, match="imgbase.toml:2: .* is not a number of seconds"):
        config.load(conf)


def test_status_shows_trial_kargs_and_abandoned_layers() -> None:
    f = replace(two_layers(imgbase_tries="2", imgbase_fallback=A), env={
        "saved_entry": B, "imgbase_tries": "2", "imgbase_fallback": A})
    history = [{"event": "health", "layer": B, "good": False, "reason": "r", "time": 1},
               {"event": "abandoned", "layer": "old+1", "reason": "did not come up", "time": 2}]
    st = collect(f, history)
    b = next(la for la in st["layers"] if la["name"] == B)
    assert (b["tries_left"], b["kargs"], b["last_health"]["good"]) == (2, ["rw", "quiet"], False)
    assert st["fallback_layer"] == A
    assert st["abandoned"] == [{"time": 2, "layer": "old+1", "reason": "did not come up"}]


def test_rollback_goes_to_the_last_layer_found_healthy_not_the_previous_nvr() -> None:

    f = replace(two_layers(), booted=B, env={"saved_entry": B})
    history = [{"event": "health", "layer": A, "good": True},
               {"event": "health", "layer": "gone+1", "good": True},
               {"event": "health", "layer": B, "good": True}]
    plan = rollback.plan_rollback(f, history, None, now=1234)
    switch, remember = plan.steps[:2], plan.steps[2]
    assert written_env(replace(plan, steps=switch)) == {"saved_entry": A}
    # remembered after the switch: the agent will not roll the node forward to B again
    assert remember.write and remember.write[0] == "/var/lib/imgbase/health.json"
    event = json.loads(remember.write[1])[-1]
    assert event == {"time": 1234, "event": "rolled-back", "layer": B, "to": A}
    assert keep.rolled_back_from(json.loads(remember.write[1])) == {B}
    with pytest.raises(InputError, match="no earlier good layer"):
        rollback.plan_rollback(f, history[2:], None)
    with pytest.raises(InputError, match="is not a layer of this node"):
        rollback.plan_rollback(f, history, "gone+1")


def test_gc_keeps_newest_booted_default_and_pinned_bases() -> None:
    from imgbase.node import gc

    extra = []
    for v in ("0.8", "0.9", "2.0", "3.0"):
        extra += [lv(f"n-{v}-1", "Vri---tz-k", tags="imgbase:base"),
                  lv(f"n-{v}-1+1", origin=f"n-{v}-1", tags="imgbase:layer")]
    extra[2] = replace(extra[2], tags=extra[2].tags | {"imgbase:pinned"})  # n-0.9-1 pinned
    f = node(*extra, entries=(A, "n-0.8-1+1", "n-3.0-1+1"))  # booted/default: n-1.0-1+1
    plan = gc.plan_gc(f, keep=2)
    removed = [s.argv[-1].split("/")[-1] for s in plan.steps if s.argv[:1] == ("lvremove",)]
    assert removed == ["n-0.8-1+1", "n-0.8-1"]
    assert gc.plan_gc(f, keep=5).steps == ()


def test_gc_keeps_the_images_last_found_healthy_over_newer_ones() -> None:
    """Rolled back from a bad 2.0 to 1.0, then updated to 3.0: 1.0 is the way back, 2.0 goes."""
    from imgbase.node import gc

    extra = []
    for v in ("2.0", "3.0"):
        extra += [lv(f"n-{v}-1", "Vri---tz-k", tags="imgbase:base"),
                  lv(f"n-{v}-1+1", origin=f"n-{v}-1", tags="imgbase:layer")]
    f = replace(node(*extra, entries=(A, "n-2.0-1+1", "n-3.0-1+1")), booted="n-3.0-1+1",
                env={"saved_entry": "n-3.0-1+1"})
    history = [{"event": "health", "layer": A, "good": True, "time": 1},
               {"event": "health", "layer": "n-2.0-1+1", "good": True, "time": 2},
               {"event": "health", "layer": A, "good": True, "time": 3},  # rolled back
               {"event": "health", "layer": "n-3.0-1+1", "good": True, "time": 4}]
    removed = [s.argv[-1].split("/")[-1] for s in gc.plan_gc(f, 2, history).steps
               if s.argv[:1] == ("lvremove",)]
    assert removed == ["n-2.0-1+1", "n-2.0-1"]
    without_history = gc.plan_gc(f, 2, []).steps  # then the newest are kept: 1.0 would go
    assert [s.argv[-1] for s in without_history if s.argv[:1] == ("lvremove",)] == [
        f"/dev/vg/{A}", f"/dev/vg/{NVR}"]


def test_gc_config_is_validated(tmp_path: Path) -> None:
    conf = tmp_path / "imgbase.toml"
    conf.write_text("[gc]\nkeep = 3\nafter_good_boot = false\n")
    assert config.load(conf).gc == config.GcSettings(3, False)
    for bad, message in (("keep = 0", "is not a number of images"),
                         ("keep = true", "is not a number of images"),
                         ("after_good_boot = 1", "is not true or false"),
                         ("kep = 2", r"unknown key 'kep' in \[gc\]")):
        conf.write_text(f"[gc]\n{bad}\n")
        with pytest.raises(InputError, match=message):
            config.load(conf)


def test_kargs_edits_one_layers_entry_through_the_gate() -> None:
    from imgbase.bootloader import kernel_args
    from imgbase.bootloader.grub import parse_entries
    from imgbase.node import kargs as node_kargs

    f = two_layers()
    assert node_kargs.current(f, None) == (A, ["rw", "quiet"])  # the booted layer's
    plan = node_kargs.plan_kargs(f, B, append=["mitigations=off"], delete=["quiet"])
    written = next(s for s in plan.steps if s.write and s.write[0].endswith(".cfg")).write
    assert written is not None
    entries = parse_entries(written[1])
    assert kernel_args(entries[B]).split() == ["rw", "mitigations=off"]
    assert kernel_args(entries[A]).split() == ["rw", "quiet"]  # the other untouched
    with pytest.raises(InputError, match="cannot go into a boot entry"):
        node_kargs.plan_kargs(f, B, append=["a;b"])
    with pytest.raises(InputError, match="has no boot entry"):
        node_kargs.plan_kargs(f, "gone+1", append=["x=1"])
    with pytest.raises(InputError, match="/boot is not mounted"):
        node_kargs.current(replace(f, unmounted="/boot is not mounted (...)"), None)


def test_health_reads_its_section_whatever_else_the_file_gets_wrong(tmp_path: Path) -> None:
    """At boot, a bad [gc] or an unknown section must not keep health from its verdict."""
    conf = tmp_path / "imgbase.toml"
    conf.write_text("[storage]\nx = 1\n[gc]\nkeep = 0\n[health]\ntimeout = 7\n")
    assert config.load(conf, only=("health",)).health.timeout == 7.0
    with pytest.raises(InputError, match="imgbase.toml:1: unknown section"):
        config.load(conf)  # an admin's imgbase check says what is wrong
