"""The CLI reference and man pages, generated from the real argparse parsers.

``docs/cli.md``, ``docs/imgbase.1`` and ``docs/imgbase-agent.8`` are made here from
:func:`imgbase.cli.build_parser` and :func:`imgbase.agent.main.build_parser`, so they
cannot drift from the code (``tests/unit/test_cli_docs.py`` fails when a committed page
differs from what this module makes)::

    python -m imgbase.clidoc --markdown docs/cli.md --man docs/imgbase.1 \\
        --agent-man docs/imgbase-agent.8            # write them (make docs)
    python -m imgbase.clidoc ... --check            # exit 1 if one is stale; write nothing

The output is deterministic: no date from the clock (the package version instead), and
no argparse help formatter, whose wrapping follows the terminal width and whose layout
changes between Python versions -- usage lines and option lists are rendered here, from
the parsers' actions, and wrapped at fixed widths.

>>> [c.name for c in imgbase_doc().walk()][:3]
['imgbase', 'imgbase compose', 'imgbase diff']
>>> roff_escape("-o, .x")
'\\\\-o, .x'
"""

from __future__ import annotations

import argparse
import functools
import inspect
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__

MD_USAGE_WIDTH = 78  # usage lines in docs/cli.md (a fenced block)
MAN_USAGE_WIDTH = 70  # usage lines in the man pages (.nf, inside the 7n body indent)
HINT = "make docs"


# -- the model: what a parser says, independent of how it is printed ------------------------

@dataclass(frozen=True)
class Arg:
    """One argument of a command: option strings (none for a positional) and metavar."""

    options: tuple[str, ...]
    metavar: str | None  # None: a flag that takes no value
    help: str

    @property
    def positional(self) -> bool:
        return not self.options

    def plain(self) -> str:
        """The argument as typed, e.g. ``-o, --output OUT``.

        >>> Arg(("-o", "--output"), "OUT", "").plain()
        '-o, --output OUT'
        """
        names = ", ".join(self.options)
        if self.metavar is None:
            return names
        return f"{names} {self.metavar}" if names else self.metavar


@dataclass(frozen=True)
class Command:
    """A parser: the program itself, a verb, or a nested action (``imgbase fleet status``)."""

    name: str  # the whole command line, e.g. "imgbase fleet status"
    summary: str  # the help given to add_parser (the parent's list of verbs)
    description: str
    usage: tuple[str, ...]  # the usage line's parts, e.g. ("imgbase", "[--debug]", "VERB ...")
    args: tuple[Arg, ...]
    children: tuple[Command, ...] = field(default=())
    choices: tuple[str, ...] = field(default=())  # a positional's choices (imgbase-agent)

    @property
    def verb(self) -> str:
        return self.name.split(" ", 1)[1] if " " in self.name else ""

    def walk(self) -> Iterator[Command]:
        yield self
        for child in self.children:
            yield from child.walk()

    def usage_lines(self, width: int) -> list[str]:
        """The usage, wrapped at whole parts; continuation lines under the first argument.

        >>> Command("p v", "", "", ("p v", "[-a A]", "[-b B]", "X"), ()).usage_lines(14)
        ['p v [-a A]', '    [-b B] X']
        """
        first, *parts = self.usage
        indent = " " * (len(first) + 1)
        lines = [first]
        for part in parts:
            if len(lines[-1]) + 1 + len(part) > width and lines[-1].strip() not in ("", first):
                lines.append(indent + part)
            else:
                lines[-1] += " " + part
        return lines


def _expand(action: argparse.Action, prog: str) -> str:
    """An action's help with %(default)s, %% etc. expanded, as argparse prints it."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    for name in list(params):
        if hasattr(params[name], "__name__"):
            params[name] = params[name].__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return " ".join((action.help % params).split())


def _format_text(text: str | None, prog: str) -> str:
    """A description as argparse prints it: %(prog)s expanded only when it is there."""
    if not text:
        return ""
    if "%(prog)" in text:
        text = text % {"prog": prog}
    return " ".join(text.split())


def _base_metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, str):
        return action.metavar
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest if not action.option_strings else action.dest.upper()


def _metavar(action: argparse.Action) -> str | None:
    """The value's placeholder as usage shows it, e.g. ``[BASE]`` for nargs="?"."""
    if action.nargs == 0:
        return None
    base = _base_metavar(action)
    nargs = action.nargs
    if nargs is None:
        return base
    if nargs == "?":
        return f"[{base}]"
    if nargs == "*":
        return f"[{base} ...]"
    if nargs == "+":
        return f"{base} [{base} ...]"
    if nargs in (argparse.PARSER, argparse.REMAINDER):
        return f"{base} ..."
    if isinstance(nargs, int):
        return " ".join([base] * nargs)
    return base


def _shown(action: argparse.Action) -> bool:
    return not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS


def _usage(name: str, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """Like argparse's usage line (without -h): optionals, then positionals; a mutually
    exclusive group as ``[a | b]`` (``(a | b)`` when one is required)."""
    group_of: dict[int, argparse._MutuallyExclusiveGroup] = {}
    for mutex in parser._mutually_exclusive_groups:
        for action in mutex._group_actions:
            group_of[id(action)] = mutex

    def term(action: argparse.Action) -> str:
        metavar = _metavar(action)
        if not action.option_strings:
            return metavar or action.dest
        return action.option_strings[0] + (f" {metavar}" if metavar else "")

    parts = [name]
    done: set[int] = set()
    actions = [a for a in parser._actions if _shown(a)]
    for action in [a for a in actions if a.option_strings]:
        group = group_of.get(id(action))
        if group is None:
            parts.append(term(action) if action.required else f"[{term(action)}]")
        elif id(group) not in done:
            done.add(id(group))
            inner = " | ".join(term(a) for a in group._group_actions if _shown(a))
            parts.append(f"({inner})" if group.required else f"[{inner}]")
    parts.extend(term(a) for a in actions if not a.option_strings)
    return tuple(parts)


def describe(parser: argparse.ArgumentParser, name: str | None = None,
             summary: str = "") -> Command:
    """The model of a parser and, recursively, of its subcommands."""
    name = name or parser.prog
    args: list[Arg] = []
    children: list[Command] = []
    choices: tuple[str, ...] = ()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: _expand(a, name) for a in action._choices_actions}
            seen: set[int] = set()
            for verb, sub in action.choices.items():
                if id(sub) in seen:  # an alias
                    continue
                seen.add(id(sub))
                summary = helps.get(verb) or (  # an internal verb: its description says
                    (sub.description or "").split(":")[0].lower())
                children.append(describe(sub, f"{name} {verb}", summary))
            continue
        if not _shown(action):
            continue
        if not action.option_strings and action.choices is not None:
            choices = tuple(str(c) for c in action.choices)
        # as --help lists them: a positional by its bare name, an option with its nargs
        metavar = _metavar(action) if action.option_strings else _base_metavar(action)
        args.append(Arg(tuple(action.option_strings), metavar, _expand(action, name)))
    args.sort(key=lambda a: not a.positional)  # positionals first, as --help lists them
    return Command(name, summary, _format_text(parser.description, name),
                   _usage(name, parser), tuple(args), tuple(children), choices)


def imgbase_doc() -> Command:
    from .cli import build_parser

    return describe(build_parser(), "imgbase")


def agent_doc() -> Command:
    from .agent.main import build_parser

    return describe(build_parser(), "imgbase-agent")


# -- exit codes and files: read from the code, not restated -----------------------------------

def exit_codes() -> list[tuple[int, str, str]]:
    """(code, constant, meaning) from the table in imgbase/errors.py (the comment on each
    line is its meaning), then the codes of single commands.

    >>> exit_codes()[1]
    (1, 'EXIT_FAILURE', 'an operation failed (a command, a build step)')
    """
    from . import errors
    from .node import update

    source = inspect.getsource(errors)
    table: list[tuple[int, str, str]] = []
    for m in re.finditer(r"^(EXIT_[A-Z_]+) = (\d+)[ \t]*(?:#[ \t]*(.*))?$", source, re.M):
        name, code, meaning = m.group(1), int(m.group(2)), (m.group(3) or "").strip()
        assert getattr(errors, name) == code, name
        table.append((code, name, meaning or ("success" if code == 0 else name.lower())))
    table.append((update.EXIT_UP_TO_DATE, "EXIT_UP_TO_DATE",
                  "imgbase update: the image is already on the node (a package's post-install "
                  "script counts it as success)"))
    return sorted(table)


def agent_exit_codes() -> list[tuple[int, str, str]]:
    from . import errors
    from .agent import main

    return [
        (errors.EXIT_OK, "EXIT_OK", "success; also run on a node with no cluster config (a "
         "node outside any cluster)"),
        (errors.EXIT_FAILURE, "EXIT_FAILURE", "registered: the agent is not registered; "
         "status: the agent has written no state (not running)"),
        (errors.EXIT_USAGE, "EXIT_USAGE", "bad arguments"),
        (main.EX_CONFIG, "EX_CONFIG", "run: the configuration is bad (the unit fails and is not "
         "restarted; the node boots)"),
    ]


def _path(module: str, attr: str, suffix: str = "") -> str:
    import importlib

    return str(getattr(importlib.import_module(f"imgbase.{module}"), attr)) + suffix


# the default of $IMGBASE_CACHE (imgbase/compose/build.py), not the value in this environment
COMPOSE_CACHE_DEFAULT = "/var/cache/imgbase"


def files() -> list[tuple[str, str]]:
    """The files imgbase reads and writes, each path taken from the constant that holds it."""
    return [
        (_path("config", "CONFIG"),
         "settings: [check] pool_data_max and pool_metadata_max (percent), [gc] keep and "
         "after_good_boot, [health] timeout and required_units"),
        (_path("node.health", "HEALTH_D", "/{required,wanted}/"),
         "executables run by imgbase health, in name order; exit 0 is a pass"),
        (_path("image.trust", "TRUSTED", "/"),
         "the OpenPGP keys (*.gpg) whose signatures imgbase update accepts"),
        (_path("node.agentconfig", "CONFIG"),
         "the cluster agent's config (written by imgbase install --join); imgbase fleet "
         "reads it when no --endpoints are given"),
        (_path("plan", "JOURNAL"),
         "the journal of every operation's steps; imgbase recover reads it"),
        (_path("node.health", "HISTORY"), "the health history: checks, trials, abandoned layers"),
        (_path("image.fetch", "DOWNLOADS", "/"),
         "images imgbase update downloads, with their .sha256 and .sha256.sig"),
        (_path("plan", "LOCK"), "held while an operation changes the node"),
        (_path("node.install", "JOURNAL"), "the journal of imgbase install (live environment)"),
        (_path("node.adopt", "JOURNAL"), "the journal of imgbase layout --init"),
        (_path("node.selfcheck", "IMAGE_JSON"),
         "in an image: its name, version and how it was made"),
        ("$IMGBASE_CACHE (default " + COMPOSE_CACHE_DEFAULT + ")",
         "imgbase compose: downloaded packages and finished images"),
    ]


def agent_files() -> list[tuple[str, str]]:
    return [
        (_path("node.agentconfig", "CONFIG"),
         "the config: [cluster] endpoints, group and TLS files, [agent] settings; the kernel "
         "command line (imgbase.agent.endpoints=, imgbase.agent.group=) wins over it"),
        (_path("agent.main", "STATE"), "the agent's state, as imgbase-agent status shows it"),
        (_path("agent.main", "HOLDING"), "the FleetLock reboot slot the node holds, across "
         "reboots"),
        (_path("node.agentconfig", "MACHINE_ID"), "the node id is derived from it"),
    ]


def agent_notes() -> list[str]:
    """The paragraphs of imgbase-agent's module docstring after its first (the summary) and
    its command list."""
    from .agent import main

    doc = main.__doc__ or ""
    return [" ".join(p.split()) for p in doc.strip().split("\n\n")[1:]
            if p.strip() and not p.startswith(" ")]


# -- Markdown --------------------------------------------------------------------------------

def md_escape(text: str) -> str:
    r"""Prose for Markdown: ``x`` becomes a code span; other markup characters are escaped.

    >>> md_escape("<name>-x_y ``a*b`` [c]")
    '\\<name>-x\\_y `a*b` \\[c]'
    """
    out = []
    for i, piece in enumerate(re.split(r"``(.+?)``", text)):
        if i % 2:
            out.append(f"`{piece}`")
        else:
            out.append(re.sub(r"([\\`*_<\[|])", r"\\\1", piece))
    return "".join(out)


def _md_cell(text: str) -> str:
    return md_escape(text)


def _md_code_cell(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def _md_command(cmd: Command, level: int) -> list[str]:
    out = [f"{'#' * level} {cmd.name}", ""]
    if cmd.summary:
        out += [f"*{md_escape(cmd.summary)}*", ""]
    out += ["```text", *cmd.usage_lines(MD_USAGE_WIDTH), "```", ""]
    if cmd.description:
        out += [md_escape(cmd.description), ""]
    if cmd.args:
        out += ["| Argument | Description |", "|---|---|"]
        out += [f"| {_md_code_cell(a.plain())} | {_md_cell(a.help)} |" for a in cmd.args]
        out.append("")
    if cmd.children:
        out += ["| Command | Description |", "|---|---|"]
        out += [f"| [`{c.name}`](#{_anchor(c.name)}) | {_md_cell(c.summary)} |"
                for c in cmd.children]
        out.append("")
    for child in cmd.children:
        out += _md_command(child, level + 1)
    return out


def _md_table(head: tuple[str, str], rows: Sequence[tuple[str, str]]) -> list[str]:
    return [f"| {head[0]} | {head[1]} |", "|---|---|",
            *(f"| {_md_code_cell(a)} | {_md_cell(b)} |" for a, b in rows), ""]


def markdown() -> str:
    main, agent = imgbase_doc(), agent_doc()
    out = [
        "# Command-line reference",
        "",
        "<!-- Generated by `python -m imgbase.clidoc` from the argparse parsers; do not "
        "edit: run `make docs`. -->",
        "",
        f"imgbase {__version__}. This page is generated from the parsers themselves "
        "(`imgbase/clidoc.py`), as are the man pages `imgbase(1)` and `imgbase-agent(8)`; "
        "every command also takes `-h`, `--help`.",
        "",
    ]
    out += _md_command(main, 2)
    out += ["## Exit status", ""]
    out += _md_table(("Code", "Meaning"),
                     [(str(code), meaning) for code, _, meaning in exit_codes()])
    out += ["## Files", ""]
    out += _md_table(("Path", "What"), files())
    out += _md_command(agent, 2)
    out += ["### imgbase-agent: exit status", ""]
    out += _md_table(("Code", "Meaning"),
                     [(str(code), meaning) for code, _, meaning in agent_exit_codes()])
    out += ["### imgbase-agent: files", ""]
    out += _md_table(("Path", "What"), agent_files())
    while out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


# -- roff (man(7)) ---------------------------------------------------------------------------

def roff_escape(text: str) -> str:
    """Text for roff: backslashes and minus signs escaped, no line taken for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def roff_text(text: str) -> str:
    """Prose for roff: ``x`` in bold."""
    return "".join(f"\\fB{roff_escape(p)}\\fR" if i % 2 else roff_escape(p)
                   for i, p in enumerate(re.split(r"``(.+?)``", text)))


def _roff_arg(arg: Arg) -> str:
    names = ", ".join(f"\\fB{roff_escape(o)}\\fR" for o in arg.options)
    if arg.metavar is None:
        return names
    metavar = f"\\fI{roff_escape(arg.metavar)}\\fR"
    return f"{names} {metavar}" if names else metavar


def _roff_tp(tag: str, body: str) -> list[str]:
    return [".TP", tag, *([body] if body else [])]


def _roff_args(cmd: Command) -> list[str]:
    out: list[str] = []
    for arg in cmd.args:
        out += _roff_tp(_roff_arg(arg), roff_text(arg.help))
    return out


def _roff_command(cmd: Command) -> list[str]:
    out = [f".SS {roff_escape(cmd.name)}"]
    if cmd.summary:
        out += [roff_text(cmd.summary[:1].upper() + cmd.summary[1:] + "."), ".PP"]
    out += [".nf", *(roff_escape(line) for line in cmd.usage_lines(MAN_USAGE_WIDTH)), ".fi"]
    if cmd.description:
        out += [".PP", roff_text(cmd.description)]
    if cmd.args:
        out += [".PP", *_roff_args(cmd)]
    for child in cmd.children:
        out += _roff_command(child)
    return out


def _roff_header(cmd: Command, section: int, purpose: str) -> list[str]:
    return [
        '.\\" Generated by python -m imgbase.clidoc from the argparse parsers; do not edit:',
        '.\\" run make docs.',
        f'.TH {cmd.name.upper()} {section} "" "imgbase {__version__}" "imgbase manual"',
        ".nh",  # no hyphenation (of paths, options) ...
        ".ad l",  # ... and no stretched lines
        ".SH NAME",
        f"{roff_escape(cmd.name)} \\- {roff_text(purpose)}",
        ".SH SYNOPSIS",
        ".nf",
        *(roff_escape(line) for line in cmd.usage_lines(MAN_USAGE_WIDTH)),
        ".fi",
    ]


def _roff_table(rows: Sequence[tuple[str, str]]) -> list[str]:
    out: list[str] = []
    for a, b in rows:
        out += _roff_tp(f"\\fB{roff_escape(a)}\\fR", roff_text(b))
    return out


def _purpose(cmd: Command) -> str:
    """The NAME line's text: the description's first sentence, lowercased, no full stop."""
    text = cmd.description.split(". ")[0].rstrip(".")
    text = re.sub(r"^``[^`]*``:\s*", "", text)  # imgbase-agent's "``imgbase-agent``: ..."
    return text[:1].lower() + text[1:]


def man_imgbase() -> str:
    cmd = imgbase_doc()
    out = _roff_header(cmd, 1, _purpose(cmd))
    out += [
        ".SH DESCRIPTION",
        roff_text(cmd.description),
        ".PP",
        roff_text("A node keeps each image version as a read-only thin base on LVM, with "
                  "writable thin-snapshot layers as its root file system; imgbase composes "
                  "images, installs nodes, updates, rolls back and checks them. Every "
                  "command also takes ``-h``, ``--help``."),
        ".SH OPTIONS",
        *_roff_args(cmd),
        ".SH COMMANDS",
    ]
    for child in cmd.children:
        out += _roff_command(child)
    out += [".SH EXIT STATUS", *_roff_table([(str(c), m) for c, _, m in exit_codes()])]
    out += [".SH FILES", *_roff_table(files())]
    out += [
        ".SH SEE ALSO",
        "\\fBimgbase\\-agent\\fR(8), \\fBlvmthin\\fR(7), \\fBgpgv\\fR(1), "
        "\\fBqemu\\-system\\-x86_64\\fR(1)",
        ".PP",
        roff_text("README.md and docs/*.md in the imgbase source tree; docs/cli.md is this "
                  "reference as Markdown."),
    ]
    return "\n".join(out) + "\n"


def man_agent() -> str:
    cmd = agent_doc()
    out = _roff_header(cmd, 8, _purpose(cmd))
    out += [".SH DESCRIPTION", roff_text(_purpose(cmd)[:1].upper() + _purpose(cmd)[1:] + ".")]
    for para in agent_notes():
        out += [".PP", roff_text(para)]
    out += [".SH OPTIONS", *_roff_args(cmd)]
    out += [".SH EXIT STATUS", *_roff_table([(str(c), m) for c, _, m in agent_exit_codes()])]
    out += [".SH FILES", *_roff_table(agent_files())]
    out += [".SH SEE ALSO", "\\fBimgbase\\fR(1), \\fBsystemd.service\\fR(5), \\fBetcd\\fR(1)"]
    return "\n".join(out) + "\n"


# -- shell completion (shtab) ----------------------------------------------------------------

#: the completion files, by name, under docs/completions (the .deb installs them)
COMPLETIONS = {"imgbase.bash": ("imgbase", "bash"), "_imgbase": ("imgbase", "zsh"),
               "imgbase-agent.bash": ("imgbase-agent", "bash"),
               "_imgbase-agent": ("imgbase-agent", "zsh")}


def completion(program: str, shell: str) -> str:
    """bash or zsh completion of imgbase or imgbase-agent, generated from its parser."""
    import shtab

    from .agent.main import build_parser as agent_parser
    from .cli import build_parser

    parser = build_parser() if program == "imgbase" else agent_parser()
    return str(shtab.complete(parser, shell=shell)).rstrip("\n") + "\n"


# -- the command ---------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imgbase.clidoc",
        description="Write (or, with --check, compare) the CLI reference and man pages "
        "generated from the argparse parsers.")
    parser.add_argument("--markdown", metavar="FILE", help="the Markdown reference")
    parser.add_argument("--man", metavar="FILE", help="imgbase(1)")
    parser.add_argument("--agent-man", metavar="FILE", help="imgbase-agent(8)")
    parser.add_argument("--completions", metavar="DIR",
                        help="bash and zsh completion of both commands, into DIR")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a file differs from what it would be")
    args = parser.parse_args(argv)
    wanted: list[tuple[str, Callable[[], str]]] = [
        (path, make) for path, make in ((args.markdown, markdown), (args.man, man_imgbase),
                                        (args.agent_man, man_agent)) if path]
    if args.completions:
        wanted += [(str(Path(args.completions) / name), functools.partial(completion, *what))
                   for name, what in COMPLETIONS.items()]
    if not wanted:
        parser.error("name at least one of --markdown, --man, --agent-man, --completions")
    stale: list[str] = []
    for path, make in wanted:
        text = make()
        target = Path(path)
        try:
            current = target.read_text()
        except FileNotFoundError:
            current = None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            target.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"clidoc: {', '.join(stale)} {'is' if len(stale) == 1 else 'are'} stale: "
              f"not what the CLI parsers generate (run `{HINT}`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
