"""The CLI a new admin meets: what --help lists, help on every option, no clashing
--version, and plain words off a node."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from imgbase import cli
from imgbase.agent import main as agent_main
from tests.conftest import ROOT


def imgbase(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path} if path is not None else None
    return subprocess.run([sys.executable, "-m", "imgbase", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env)


def test_internal_verbs_are_not_listed_but_can_be_called() -> None:
    listed = imgbase("--help").stdout
    for verb in cli.INTERNAL:
        assert f" {verb} " not in listed and f" {verb}\n" not in listed
        proc = imgbase(verb, "--help")
        assert proc.returncode == 0 and "Internal" in proc.stdout, proc.stderr
    assert " update " in listed  # an admin's verb is


def parsers(parser: argparse.ArgumentParser, name: str):  # type: ignore[no-untyped-def]
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield from parsers(sub, f"{name} {verb}")


@pytest.mark.parametrize("build, prog", [(cli.build_parser, "imgbase"),
                                          (agent_main.build_parser, "imgbase-agent")])
def test_every_option_has_help(build, prog: str) -> None:  # type: ignore[no-untyped-def]
    missing = [f"{name} {action.option_strings or action.dest}"
               for name, parser in parsers(build(), prog) for action in parser._actions
               if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
               and not action.help]
    assert missing == []


def test_compose_takes_image_version_and_version_is_the_programs() -> None:
    assert "--image-version" in imgbase("compose", "--help").stdout
    proc = imgbase("compose", "images/node.toml", "--version", "9")
    assert proc.returncode == 2 and "unrecognized arguments: --version" in proc.stderr
    assert imgbase("--version").stdout.startswith("imgbase ")


def test_the_agents_help_is_plain_text() -> None:
    text = agent_main.build_parser().format_help()
    assert "``" not in text and "cluster agent" in text


@pytest.mark.parametrize("verb", [["status"], ["check"], ["rollback"], ["gc", "--dry-run"]])
def test_off_a_node_the_verbs_say_so(verb: list[str]) -> None:
    proc = imgbase(*verb, path="/nonexistent")  # no LVM tools on this PATH
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("imgbase: error: this machine is not an imgbase node")
    assert "make setup" not in proc.stderr
