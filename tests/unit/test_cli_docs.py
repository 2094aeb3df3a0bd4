"""The CLI docs cannot drift: the reference and man pages are what the parsers generate, and
the prose docs only use verbs the CLI has."""

from __future__ import annotations

import difflib
import functools
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imgbase import clidoc, errors
from tests.conftest import ROOT

GENERATED: dict[str, Callable[[], str]] = {
    "docs/cli.md": clidoc.markdown,
    "docs/imgbase.1": clidoc.man_imgbase,
    "docs/imgbase-agent.8": clidoc.man_agent,
    **{f"docs/completions/{name}": functools.partial(clidoc.completion, *what)
       for name, what in clidoc.COMPLETIONS.items()},
}
MAN_PAGES = ("docs/imgbase.1", "docs/imgbase-agent.8")


@pytest.mark.parametrize("path", sorted(GENERATED))
def test_committed_page_is_what_the_parsers_generate(path: str) -> None:
    committed = (ROOT / path).read_text() if (ROOT / path).exists() else ""
    generated = GENERATED[path]()
    if committed != generated:
        diff = list(difflib.unified_diff(committed.splitlines(), generated.splitlines(),
                                         f"{path} (committed)", f"{path} (generated)",
                                         lineterm=""))
        pytest.fail(f"{path} is stale: run `make docs` and commit the result\n"
                    + "\n".join(diff[:60]), pytrace=False)


def test_every_command_is_in_the_reference_and_the_man_page() -> None:
    cli_md = (ROOT / "docs/cli.md").read_text()
    man = (ROOT / "docs/imgbase.1").read_text()
    commands = [c for c in clidoc.imgbase_doc().walk() if c.verb]
    assert len(commands) > 20
    for cmd in commands:
        assert re.search(rf"^#+ {re.escape(cmd.name)}$", cli_md, re.M), \
            f"{cmd.name!r} has no section in docs/cli.md (run `make docs`)"
        assert f".SS {clidoc.roff_escape(cmd.name)}\n" in man, \
            f"{cmd.name!r} has no section in docs/imgbase.1 (run `make docs`)"
    nested = {c.name for c in commands if c.verb.count(" ") == 1}
    assert {"imgbase fleet status", "imgbase kickstart render"} <= nested


def test_every_agent_command_is_documented() -> None:
    agent = clidoc.agent_doc()
    assert agent.choices == ("run", "registered", "status")
    section = (ROOT / "docs/cli.md").read_text().split("\n## imgbase-agent\n", 1)[1]
    man = (ROOT / "docs/imgbase-agent.8").read_text()
    for choice in agent.choices:
        assert f"{choice}:" in section, f"imgbase-agent {choice} is missing from docs/cli.md"
        assert f"{choice}:" in man, f"imgbase-agent {choice} is missing from the man page"


def test_exit_status_lists_every_code_of_the_table() -> None:
    table = {code for code, _, _ in clidoc.exit_codes()}
    constants = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert constants <= table
    assert all(meaning for _, _, meaning in clidoc.exit_codes())


def test_files_are_paths_the_code_uses() -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "imgbase").rglob("*.py")
                        if p.name != "clidoc.py")
    for path, _ in clidoc.files() + clidoc.agent_files():
        if path.startswith("$IMGBASE_CACHE"):
            path = clidoc.COMPOSE_CACHE_DEFAULT
        literal = path.split("/{")[0].rstrip("/")
        assert f'"{literal}"' in sources, f"{literal} is in FILES but not in the code"


# -- every verb the docs use exists ----------------------------------------------------------

SHELL_FENCES = {"", "sh", "shell", "bash", "console", "shell-session", "text"}
SESSION_FENCES = {"console", "shell-session"}  # commands after a prompt, then their output
PROMPT = re.compile(r"^\s*[\w@.-]*[$#] ")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
# `imgbase VERB`: not imgbase-agent, imgbase/paths, imgbase: tags or imgbase.agent.x=
USE = re.compile(r"(?<![\w.-])imgbase\s+([^\s`'\"|;&()<>]+)(?:\s+([^\s`'\"|;&()<>]+))?")
WORD = re.compile(r"[a-z][a-z0-9-]*")


def code_in(text: str) -> Iterator[tuple[int, str]]:
    """(line number of its start, text) of every fenced block of a shell-like language
    (whole) and every inline code span (one per span, which may cross lines)."""
    lines = text.split("\n")
    prose = list(lines)
    fence: str | None = None
    shell = session = False
    for i, line in enumerate(lines):
        m = FENCE.match(line)
        if fence is None and m:
            fence, shell = m.group(1), m.group(2).lower() in SHELL_FENCES
            session = m.group(2).lower() in SESSION_FENCES
            prose[i] = ""
        elif fence is not None:
            prose[i] = ""
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            elif shell and (not session or PROMPT.match(line)):
                yield i + 1, line
    joined = "\n".join(prose)
    for para in re.finditer(r"(?:[^\n]+\n?)+", joined):
        for span in re.finditer(r"(`+)(.+?)\1", para.group(0), re.S):
            yield joined.count("\n", 0, para.start() + span.start()) + 1, span.group(2)


def verb_uses(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line, verb, action or None) of each ``imgbase VERB [ACTION]`` in the code of a doc."""
    for start, code in code_in(path.read_text()):
        for m in USE.finditer(code):
            verb = m.group(1).rstrip(".,:")
            if not WORD.fullmatch(verb):  # a flag, a placeholder (VERB, <verb>, ...)
                continue
            action = (m.group(2) or "").rstrip(".,:")
            yield (start + code.count("\n", 0, m.start()), verb,
                   action if WORD.fullmatch(action) else None)


def prose_docs() -> list[Path]:
    return [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md")
                                        if p.name != "cli.md")]


def test_scanner_finds_only_command_uses(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("Prose: imgbase images are squashfs; `imgbase status` and `imgbase\n"
                   "fleet pause`, not `imgbase-agent run`, `imgbase/cli.py`, `imgbase:pinned`,\n"
                   "`imgbase --version` or `imgbase VERB`.\n"
                   "```toml\nx = 1   # imgbase itself\n```\n"
                   "```sh\n.venv/bin/imgbase compose images/node.toml -o out\n```\n"
                   "```console\nnode# imgbase check\nok vg volume group imgbase tagged\n"
                   "$ imgbase fleet status\n```\n")
    assert list(verb_uses(doc)) == [(8, "compose", None), (11, "check", None),
                                    (13, "fleet", "status"), (1, "status", None),
                                    (1, "fleet", "pause")]


def test_docs_mention_only_real_verbs() -> None:
    actions = {c.verb.split()[0]: {a.verb.split()[1] for a in c.children}
               for c in clidoc.imgbase_doc().children}
    bad = []
    for doc in prose_docs():
        for line, verb, action in verb_uses(doc):
            where = f"{doc.relative_to(ROOT)}:{line}"
            if verb not in actions:
                bad.append(f"{where}: imgbase {verb}: no such verb")
            elif actions[verb] and action is not None and action not in actions[verb]:
                bad.append(f"{where}: imgbase {verb} {action}: no such action")
    assert not bad, "the docs use commands the CLI does not have:\n" + "\n".join(bad)


# -- the man pages render ----------------------------------------------------------------------

@pytest.mark.parametrize("page", MAN_PAGES)
def test_man_page_renders_without_warnings(page: str) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (apt package groff-base)")
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(ROOT / page)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stderr == "", f"{page}: {proc.stderr}"


# -- python -m imgbase.clidoc --check ----------------------------------------------------------

def test_check_names_the_stale_file_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, stale = tmp_path / "cli.md", tmp_path / "imgbase.1"
    good.write_text(clidoc.markdown())
    stale.write_text("old\n")
    assert clidoc.main(["--markdown", str(good), "--man", str(stale), "--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(stale) in err and str(good) not in err
    assert "make docs" in err
    assert stale.read_text() == "old\n"
    assert clidoc.main(["--man", str(stale)]) == 0
    assert clidoc.main(["--markdown", str(good), "--man", str(stale), "--check"]) == 0
