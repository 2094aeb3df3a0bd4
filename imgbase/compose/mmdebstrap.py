"""The mmdebstrap backend: Debian root trees in one apt transaction."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from ..errors import ImgbaseError
from ..run import CommandError, run, stream
from .backend import BuildContext, ComposerBackend, Package

_UNPACK = re.compile(r"^(?:I: )?(?:Unpacking|Setting up) (\S+)")
_NOT_FOUND = [
    re.compile(r"Unable to locate package (\S+)"),
    re.compile(r"Package '?(\S+?)'? has no installation candidate"),
    re.compile(r"E: Couldn't find any package by \S+ for '(\S+)'"),
]


class MmdebstrapBackend(ComposerBackend):
    name = "mmdebstrap"
    tools = {"mmdebstrap": "mmdebstrap", "dpkg-query": "dpkg", "dpkg-deb": "dpkg"}

    def sources(self, ctx: BuildContext) -> list[str]:
        img = ctx.image
        lines = [f"deb {img.mirror} {img.suite} main"]
        if img.suite not in ("sid", "unstable", "testing"):
            lines.append(f"deb {img.mirror} {img.suite}-updates main")
            lines.append(f"deb {img.security_mirror} {img.suite}-security main")
        return lines

    def argv(self, ctx: BuildContext, tree: Path) -> list[str]:
        apt_cache = ctx.cache_dir / "apt-archives"
        apt_cache.mkdir(parents=True, exist_ok=True)
        argv = [
            "mmdebstrap", "--mode=root", "--variant=minbase", f"--arch={ctx.image.architecture}",
            "--format=directory", "--verbose",
            "--include=" + ",".join(ctx.image.packages),
            *[f"--include={p}" for p in ctx.local_packages],
            "--skip=download/empty",
            "--dpkgopt=force-unsafe-io",
            '--setup-hook=mkdir -p "$1/var/cache/apt/archives"',
            f"--setup-hook=sync-in {shlex.quote(str(apt_cache))} /var/cache/apt/archives",
            f"--customize-hook=sync-out /var/cache/apt/archives {shlex.quote(str(apt_cache))}",
            '--customize-hook=rm -f "$1"/var/cache/apt/archives/*.deb',
        ]
        if ctx.local_packages:
            argv.append("--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount")
        return [*argv, ctx.image.suite, str(tree), *self.sources(ctx)]

    def build_tree(self, ctx: BuildContext, tree: Path) -> None:
        progress = ctx.progress
        seen: set[str] = set()
        total = len(ctx.image.packages)

        def on_line(line: str) -> None:
            m = _UNPACK.match(line)
            if m:
                seen.add(m[1].split(":")[0])
                progress.status(f"{len(seen)} packages unpacked/set up ({total} requested)")

        try:
            stream(self.argv(ctx, tree), on_line=on_line, logfile=ctx.logfile, env=ctx.env)
        except CommandError as exc:
            raise self._explain(ctx, exc) from exc
        for deb in ctx.local_packages:
            _remove_copied_deb(tree, deb)


    def _explain(self, ctx: BuildContext, exc: CommandError) -> ImgbaseError:
        """Turn apt's complaint about a package into one naming the layer."""
        text = ctx.logfile.read_text(errors="replace") if ctx.logfile.exists() else exc.tail
        for pattern in _NOT_FOUND:
            for m in pattern.finditer(text):
                pkg = m[1].strip("'\"")
                layer = ctx.image.layer_of_package(pkg)
                if layer:
                    return ImgbaseError(
                        f"unknown package {pkg!r} in layer {layer.name!r} ({layer.path})",
                        hint=f"no package of that name in {ctx.image.distro} {ctx.image.suite}; "
                        "check the spelling with 'apt-cache policy NAME'",
                    )
        exc.hint = f"see the build log {ctx.logfile}"
        return exc

    def installed_packages(self, tree: Path) -> list[Package]:
        out = run(["dpkg-query", f"--admindir={tree}/var/lib/dpkg", "-W",
                   "-f=${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"]).stdout
        pkgs = []
        for line in out.splitlines():
            status, name, version, arch = line.split("\t")
            if status.startswith("ii"):
                pkgs.append(Package(name, version, arch))
        return sorted(pkgs, key=lambda p: p.name)

    def package_db_paths(self) -> tuple[str, ...]:
        return ("var/lib/dpkg",)


def _packaged_dirs(tree: Path) -> set[str]:
    """Every path some installed package owns (dpkg's file lists), as /-rooted strings."""
    owned: set[str] = set()
    for info in ("var/lib/dpkg/info", "usr/lib/sysimage/dpkg/info"):
        for listing in (tree / info).glob("*.list"):
            owned.update(listing.read_text(errors="replace").splitlines())
    return owned


def _remove_copied_deb(tree: Path, deb: Path) -> None:
    """mmdebstrap needs a local .deb at its host path inside the tree too; remove
    that copy and the directories made for it (they name the cache location), but
    never a directory a package owns: with the cache under /var/tmp, /var/tmp stays."""
    copy = tree / deb.relative_to("/")
    if copy.is_file():
        copy.unlink()
    owned = _packaged_dirs(tree)
    inside = copy.parent
    while (inside != tree and inside.is_dir() and not any(inside.iterdir())
           and f"/{inside.relative_to(tree)}" not in owned):
        inside.rmdir()
        inside = inside.parent
