"""The import graph runs one way (docs/design.md, the layers): the import-linter contract
in pyproject.toml holds, an upward import breaks it, and no module takes another module's
private name or closes a cycle of imports."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config",
                           str(tree / "pyproject.toml")], capture_output=True, text=True,
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})


def test_the_layers_contract_is_kept() -> None:
    proc = lint_imports(ROOT)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-3000:]


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The image layer reaching up into the node layer, as update.image_info once was."""
    shutil.copytree(ROOT / "imgbase", tmp_path / "imgbase",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    assert lint_imports(tmp_path).returncode == 0
    naming = tmp_path / "imgbase/image/naming.py"
    naming.write_text(naming.read_text() + "\n\ndef _up() -> None:\n"
                      "    from ..node.update import plan_update  # noqa: F401\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0 and "BROKEN" in proc.stdout, proc.stdout[-3000:]
    assert "imgbase.image.naming -> imgbase.node.update" in proc.stdout


def imports(package: Path) -> dict[str, list[tuple[str, str]]]:
    """Each module's imports of imgbase modules, with the names it takes (function-level
    imports too): module -> [(imported module, name)]."""
    found: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        if is_init:
            parts.pop()
        here = parts if is_init else parts[:-1]
        got = found.setdefault(".".join(parts), [])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                if target.split(".")[0] == package.name:
                    got.extend((target, alias.name) for alias in node.names)
    return found


def test_no_module_takes_another_modules_private_name() -> None:
    private = [f"{module} takes {target}.{name}"
               for module, names in imports(ROOT / "imgbase").items()
               for target, name in names
               if name.startswith("_") and not name.startswith("__")]
    assert private == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def module_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules it imports (a package's __init__ counts as the package only
    where a name is taken from it, not a submodule)."""
    found = imports(package)
    graph: dict[str, set[str]] = {}
    for module, names in found.items():
        for target, name in names:
            sub = f"{target}.{name}"
            dest = sub if sub in found else target
            if dest != module and dest in found:
                graph.setdefault(module, set()).add(dest)
    return graph


def test_no_cycle_of_imports() -> None:
    assert cycles(module_graph(ROOT / "imgbase")) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_design_md_names_every_module() -> None:
    """docs/design.md stays true to the code: each module has its row (by its path under
    imgbase/, or a package row naming it)."""
    design = (ROOT / "docs/design.md").read_text()
    missing = []
    for path in sorted((ROOT / "imgbase").rglob("*.py")):
        rel = path.relative_to(ROOT / "imgbase").as_posix()
        if path.name == "__init__.py" or path.name == "__main__.py":
            continue
        package_row = f"`{path.parent.name}/`" in design and f"`{path.name}`" in design
        if f"`{rel}`" not in design and not package_row:
            missing.append(rel)
    assert missing == [], "add these modules to docs/design.md"


def test_every_module_has_a_layer() -> None:
    """A module no layer names would be outside the contract: import-linter checks only
    the modules its layers list."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    named = {name.strip() for contract in config["contracts"] for layer in contract["layers"]
             for name in layer.replace("|", ":").split(":")}
    top = {f"imgbase.{p.stem if p.is_file() else p.name}"
           for p in (ROOT / "imgbase").iterdir()
           if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert sorted(top - named) == []


def test_systemd_and_libvirt_are_spoken_to_not_scraped() -> None:
    """The node's code reaches systemd over D-Bus and libvirt through its binding
    (node/systemd.py, node/virt.py); only compose runs systemctl, offline, in an image
    tree it enables units in."""
    users = sorted({path.relative_to(ROOT).as_posix()
                    for path in (ROOT / "imgbase").rglob("*.py")
                    for tool in ('"systemctl"', '"virsh"') if tool in path.read_text()})
    assert users == ["imgbase/compose/postprocess.py"]


def test_the_selfcheck_word_is_the_one_the_units_test_for() -> None:
    """A module move once renamed the kernel argument with the module: the self-check never
    ran, and health and the agent ran during it."""
    from imgbase.vm import SELFCHECK

    units = ROOT / "boot/systemd"
    selfcheck = (units / "imgbase-selfcheck.service").read_text()
    assert f"ConditionKernelCommandLine=|{SELFCHECK}\n" in selfcheck
    assert f"ConditionPathExists=|/run/credentials/@system/{SELFCHECK}\n" in selfcheck
    for unit in ("imgbase-health.service", "imgbase-agent.service"):
        text = (units / unit).read_text()
        assert f"ConditionKernelCommandLine=!{SELFCHECK}\n" in text
        assert f"ConditionPathExists=!/run/credentials/@system/{SELFCHECK}\n" in text
