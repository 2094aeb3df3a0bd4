"""The dnf backend: rpm root trees from the image's repos (not bootable yet).

dnf runs on the host with ``--installroot``; the configuration is generated in
the work directory (nothing of the host's /etc/dnf or /etc/yum.repos.d is read).
Debian's rpm keeps its database in ``~/.rpmdb`` unless told otherwise, so dnf
runs with a HOME whose ``.rpmmacros`` sets ``%_dbpath`` to Fedora's
``/usr/lib/sysimage/rpm``: the database lands inside the image's /usr.

dnf keeps its cache in the tree (``/var/cache/dnf`` under the installroot; a
``--setopt=cachedir`` would split it: repo caches on the host, its expiry
record in the tree), so ``$IMGBASE_CACHE/dnf`` is bind-mounted there for the
transaction, with ``keepcache``: downloaded rpms serve the next compose.
"""

from __future__ import annotations

import contextlib
import platform
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import ImgbaseError, die
from ..image.spec import ImageSpec, LayerSpec
from ..run import CommandError, run, stream
from .backend import BuildContext, ComposerBackend, Package
from .rpmdb import rpm_packages

RPMDB = "usr/lib/sysimage/rpm"
CACHE_IN_TREE = "var/cache/dnf"  # dnf's cachedir under the installroot: the bind mount
#: what dnf writes about its own run (history with host paths and times, logs): not image state
DNF_LEFTOVERS = ("var/lib/dnf", "var/log/dnf.log", "var/log/dnf.librepo.log",
                 "var/log/dnf.rpm.log", "var/log/hawkey.log")
#: directories dnf makes for itself; they go when empty and no package owns them
DNF_DIRS = ("var/lib/dnf", "var/lib", "var/log", "var", "etc/dnf/modules.d", "etc/dnf")
REPO_ID = "imgbase"
#: Debian architecture names -> rpm base architectures
RPM_ARCH = {"amd64": "x86_64", "arm64": "aarch64", "ppc64el": "ppc64le", "s390x": "s390x"}

_PROGRESS = re.compile(r"^\s*(Installing|Upgrading)\s*:\s*(\S+)")
_NOT_FOUND = [
    re.compile(r"No match for argument: (\S+)"),
    re.compile(r"nothing provides \S+ needed by (\S+?)-[^-\s]+-[^-\s]+\s"),
]


class DnfBackend(ComposerBackend):
    name = "dnf"
    tools = {"dnf": "dnf", "rpm": "rpm"}
    uses_repos = True

    def check_image(self, image: ImageSpec) -> None:
        where = f"{image.path}: the dnf backend"
        for layer in image.layers:
            if layer.imgbase_package:
                die(f"{where} cannot install imgbase itself (layer {layer.name!r} sets "
                    "imgbase_package = true): it is built as a .deb",
                    hint=f"set imgbase_package = false in {layer.path} or use mmdebstrap")
        if not image.repos:
            die(f"{where} needs repos = [...] in [image] (repository baseurls)",
                hint='e.g. repos = ["https://dl.fedoraproject.org/pub/fedora/linux/releases/'
                     '$releasever/Everything/$basearch/os/"]')
        if not image.gpgkeys and not image.unsigned:
            die(f"{where} verifies packages: give gpgkeys = [...] in [image]",
                hint="or mark a local, unsigned test repository with unsigned = true")
        if image.bootable:
            die(f"{where} composes non-bootable images only: set bootable = false in [image]",
                hint="the boot check reads Debian initramfs-tools images; dracut is not handled")
        arch, host = rpm_arch(image.architecture), platform.machine()
        if arch != host:
            die(f"{where} composes for this machine's architecture {host}, not {arch}",
                hint=f"set architecture = {host!r} or compose on a {arch} machine")

    # -- configuration ------------------------------------------------------------

    def repo_file(self, image: ImageSpec) -> str:
        lines = [f"[{REPO_ID}-{i}]\nname={image.name} repository {i}\nbaseurl={url}\n"
                 f"gpgcheck={0 if image.unsigned else 1}\n"
                 + (f"gpgkey={' '.join(image.gpgkeys)}\n" if image.gpgkeys else "")
                 for i, url in enumerate(image.repos)]
        return "\n".join(lines)

    def write_config(self, ctx: BuildContext) -> Path:
        """dnf.conf, the repo file and the rpm macros under the work directory."""
        conf = ctx.workdir / "dnf"
        (conf / "repos.d").mkdir(parents=True, exist_ok=True)
        (conf / "dnf.conf").write_text("[main]\n")
        (conf / "repos.d" / f"{REPO_ID}.repo").write_text(self.repo_file(ctx.image))
        (conf / "home").mkdir(exist_ok=True)
        (conf / "home" / ".rpmmacros").write_text(f"%_dbpath /{RPMDB}\n")
        return conf

    def argv(self, ctx: BuildContext, tree: Path, conf: Path) -> list[str]:
        argv = [
            "dnf", f"--installroot={tree}", f"--releasever={ctx.image.suite}",
            f"--config={conf / 'dnf.conf'}", f"--setopt=reposdir={conf / 'repos.d'}",
            "--setopt=varsdir=", "--noplugins", "--setopt=keepcache=True",
            "--setopt=install_weak_deps=False", "--refresh", "-y", "--nodocs",
        ]
        if ctx.image.unsigned:
            argv.append("--nogpgcheck")
        return [*argv, "install", *ctx.image.packages]

    # -- the tree -----------------------------------------------------------------

    def build_tree(self, ctx: BuildContext, tree: Path) -> None:
        conf = self.write_config(ctx)
        tree.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        total = len(ctx.image.packages)

        def on_line(line: str) -> None:
            m = _PROGRESS.match(line)
            if m:
                seen.add(m[2])
                ctx.progress.status(f"{len(seen)} packages installed ({total} requested)")

        env = {**ctx.env, "HOME": str(conf / "home")}
        try:
            with _cache_mounted(ctx.cache_dir / "dnf", tree, CACHE_IN_TREE):
                stream(self.argv(ctx, tree, conf), on_line=on_line, logfile=ctx.logfile, env=env)
        except CommandError as exc:
            raise self._explain(ctx, exc) from exc
        if not (tree / RPMDB).is_dir():
            raise ImgbaseError(f"dnf left no rpm database at /{RPMDB} in the tree",
                               hint=f"is %_dbpath overridden on this host? see {ctx.logfile}")
        _remove_dnf_leftovers(tree)

    def _explain(self, ctx: BuildContext, exc: CommandError) -> ImgbaseError:
        """Turn dnf's complaint about a package into one naming the layer."""
        text = ctx.logfile.read_text(errors="replace") if ctx.logfile.exists() else exc.tail
        for pattern in _NOT_FOUND:
            for m in pattern.finditer(text):
                layer = ctx.image.layer_of_package(m[1])
                if layer:
                    return _package_error(m[0], m[1], layer, ctx.image.repos)
        if "GPG check FAILED" in text:
            exc.hint = f"a package is not signed by any of the gpgkeys; see {ctx.logfile}"
            return exc
        exc.hint = f"see the build log {ctx.logfile}"
        return exc

    def installed_packages(self, tree: Path) -> list[Package]:
        return rpm_packages(tree)

    def package_db_paths(self) -> tuple[str, ...]:
        return ()  # the rpmdb is written to /usr/lib/sysimage/rpm directly: nothing in /var


def _package_error(complaint: str, package: str, layer: LayerSpec,
                   repos: tuple[str, ...]) -> ImgbaseError:
    where = f"package {package!r} in layer {layer.name!r} ({layer.path})"
    if complaint.startswith("No match"):
        return ImgbaseError(f"unknown {where}",
                            hint=f"no package of that name in {' '.join(repos)}; "
                                 "check the spelling with 'dnf repoquery NAME'")
    return ImgbaseError(f"uninstallable {where}: {complaint.strip()}",
                        hint=f"a dependency is missing from {' '.join(repos)}")


def rpm_arch(architecture: str) -> str:
    """The rpm base architecture of a Debian (or rpm) architecture name.

    >>> rpm_arch("amd64"), rpm_arch("x86_64")
    ('x86_64', 'x86_64')
    """
    return RPM_ARCH.get(architecture, architecture)


@contextlib.contextmanager
def _cache_mounted(cache: Path, tree: Path, rel: str) -> Iterator[None]:
    """The host's dnf cache bind-mounted at tree/rel for the duration; afterwards the
    directories made for the mount point go again, unless a package owns them."""
    cache.mkdir(parents=True, exist_ok=True)
    target = tree / rel
    made = [d for d in (target, *target.parents) if not d.exists()]  # deepest first
    target.mkdir(parents=True, exist_ok=True)
    run(["mount", "--bind", str(cache), str(target)])
    try:
        yield
    finally:
        run(["umount", "--lazy", str(target)], check=False)
        _remove_unowned_dirs(tree, made)


def _remove_dnf_leftovers(tree: Path) -> None:
    for rel in DNF_LEFTOVERS:
        path = tree / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()
    _remove_unowned_dirs(tree, [tree / rel for rel in DNF_DIRS])


def _remove_unowned_dirs(tree: Path, dirs: list[Path]) -> None:
    """rmdir each of dirs (in order) that is empty and owned by no installed package."""
    dirs = [d for d in dirs if d.is_dir() and not d.is_symlink()]
    owned = _owned(tree, dirs) if dirs and (tree / RPMDB).is_dir() else set()
    for d in dirs:
        if d not in owned:
            with contextlib.suppress(OSError):  # not empty: a package put files there
                d.rmdir()


def _owned(tree: Path, paths: list[Path]) -> set[Path]:
    """The paths some installed package owns (rpm -qf exits 1 for the others)."""
    return {p for p in paths
            if run(["rpm", f"--root={tree}", f"--dbpath=/{RPMDB}", "-qf",
                    f"/{p.relative_to(tree)}"], check=False).returncode == 0}
