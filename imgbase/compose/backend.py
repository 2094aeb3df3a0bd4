"""The compose backend interface and its registry.

A backend turns a resolved image spec into a root tree with every package of
every layer installed and a bootable initramfs. Files, hooks, services,
post-processing, squashfs and manifest are shared code (see build.py).
Subclasses register themselves by defining ``name``.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..errors import die
from ..image.spec import ImageSpec
from ..progress import Progress


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    architecture: str


@dataclass(frozen=True)
class BuildContext:
    image: ImageSpec
    workdir: Path
    cache_dir: Path
    logfile: Path
    progress: Progress
    local_packages: tuple[Path, ...] = ()

    @property
    def env(self) -> dict[str, str]:
        return {
            "SOURCE_DATE_EPOCH": str(self.image.source_date_epoch),
            "DEBIAN_FRONTEND": "noninteractive",
            "LC_ALL": "C.UTF-8",
            "TZ": "UTC",
        }


#: modules of the built-in backends, the default first; importing one registers its classes
BUILTIN_MODULES = ("mmdebstrap", "dnf", "lorax", "osbuild")


class ComposerBackend:
    name: ClassVar[str]
    #: one line for ``imgbase compose --list-backends``
    summary: ClassVar[str] = ""
    #: apt package (on this host) that provides each required tool
    tools: ClassVar[dict[str, str]] = {}
    #: why this backend cannot compose on this machine (e.g. contract-tested only), or None
    runs_here: ClassVar[str | None] = None
    #: installs from the image's ``repos`` (rpm backends); else ``repos`` is refused
    uses_repos: ClassVar[bool] = False
    #: the backend itself applies each layer's files, hooks and services (lorax: in the
    #: build kickstart's %post); the shared pipeline then does not, so hooks run once
    applies_layers: ClassVar[bool] = False
    registry: ClassVar[dict[str, type[ComposerBackend]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            ComposerBackend.registry[cls.name] = cls

    @classmethod
    def backends(cls) -> dict[str, type[ComposerBackend]]:
        """Every registered backend, the built-in ones in BUILTIN_MODULES order."""
        for module in BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{module}")

        def rank(item: tuple[str, type[ComposerBackend]]) -> tuple[int, str]:
            module = item[1].__module__.rpartition(".")[2]
            known = module in BUILTIN_MODULES
            return (BUILTIN_MODULES.index(module) if known else len(BUILTIN_MODULES), item[0])

        return dict(sorted(cls.registry.items(), key=rank))

    @classmethod
    def get(cls, name: str) -> ComposerBackend:
        backends = cls.backends()
        if name not in backends:
            die(f"unknown compose backend {name!r}",
                hint=f"available: {', '.join(backends)} (imgbase compose --list-backends)")
        return backends[name]()

    @classmethod
    def describe(cls) -> str:
        """``summary``, else the first line of the backend module's docstring."""
        doc = (cls.summary or sys.modules[cls.__module__].__doc__ or "").strip()
        first = doc.splitlines()[0] if doc else ""
        return first.removeprefix(f"The {cls.name} backend: ")

    def unavailable(self) -> str | None:
        """Why this backend cannot compose here (not runnable, tools missing), or None."""
        if self.runs_here is not None:
            return self.runs_here
        missing = self.missing_tools()
        if missing:
            tools = ", ".join(tool for tool, _ in missing)
            packages = " ".join(sorted({pkg for _, pkg in missing}))
            return f"missing {tools} (apt-get install {packages})"
        return None

    def check_image(self, image: ImageSpec) -> None:
        """Refuse (die) an image this backend cannot compose; before anything is written."""
        if image.repos and not self.uses_repos:
            die(f"{image.path}: the {self.name} backend does not use repos = [...]",
                hint="repos are for rpm backends (--backend dnf); "
                     f"the {self.name} backend installs from mirror")

    def missing_tools(self) -> list[tuple[str, str]]:
        """(tool, apt package) for every required tool not on PATH."""
        return [(tool, pkg) for tool, pkg in self.tools.items() if shutil.which(tool) is None]

    def build_tree(self, ctx: BuildContext, tree: Path) -> None:
        raise NotImplementedError

    def installed_packages(self, tree: Path) -> list[Package]:
        raise NotImplementedError

    def package_db_paths(self) -> tuple[str, ...]:
        """Paths (relative to the root) of the package database, to keep out of /var."""
        return ()
