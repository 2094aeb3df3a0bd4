"""The compose backend interface and its registry.

A backend turns a resolved image spec into a root tree with every package of
every layer installed and a bootable initramfs. Files, hooks, services,
post-processing, squashfs and manifest are shared code (see build.py).
Subclasses register themselves by defining ``name``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..errors import die
from ..progress import Progress
from ..spec import ImageSpec


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


class ComposerBackend:
    name: ClassVar[str]
    #: apt package (on this host) that provides each required tool
    tools: ClassVar[dict[str, str]] = {}
    registry: ClassVar[dict[str, type[ComposerBackend]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            ComposerBackend.registry[cls.name] = cls

    @classmethod
    def get(cls, name: str) -> ComposerBackend:
        from . import mmdebstrap  # noqa: F401  (registers the built-in backends)

        if name not in cls.registry:
            die(f"unknown compose backend {name!r}",
                hint=f"available: {', '.join(sorted(cls.registry))}")
        return cls.registry[name]()

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
