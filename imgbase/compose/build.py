"""compose_image: the one linear orchestrator, from an image spec to output files.

    preflight -> cache lookup -> imgbase .deb -> backend tree (or the kept one, as an overlay) ->
    layers (files, hooks, services) -> image.json -> scrub -> package db -> factory /etc ->
    boot check -> clamp mtimes -> file listing -> squashfs -> manifest -> cache -> output

Two caches, both under the cache directory and both skipped by ``--rebuild``: finished
images keyed by every input (:func:`inputs_digest`), and the backend's package tree keyed
by what shapes it alone (:func:`tree_digest`: distribution, mirrors, repositories, the
package list, the imgbase package), so that a change to a layer's files, hooks or services
-- a site layer, typically -- composes in seconds instead of reinstalling every package.

Everything is built under the cache's work directory and published by rename,
so an interrupted compose leaves neither a half-written output nor a cache
entry that a later compose would reuse.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import die
from ..image import filelist, squashfs
from ..image.spec import ImageSpec
from ..image.squashfs import make_squashfs, sha256_file
from ..progress import Progress
from . import debpkg, postprocess, treecache
from .backend import BuildContext, ComposerBackend
from .chroot import api_filesystems, remove_tree

GIB = 1 << 30
DEFAULT_CACHE = Path(os.environ.get("IMGBASE_CACHE", "/var/cache/imgbase"))
WORK_MIN_FREE = 3 * GIB  # tree (~0.7 GiB), squashfs, apt downloads, headroom
OUT_MIN_FREE = 1 * GIB
# NVR.sha256, and the same line as NVR.squashfs.sha256: the sidecar imgbase sign, update,
# install and fetch look for next to an image (IMAGE.sha256)
ARTIFACTS = (".squashfs", ".manifest.json", ".sha256", ".squashfs.sha256")


@dataclass(frozen=True)
class ComposeResult:
    nvr: str
    squashfs: Path
    manifest: Path
    sha256: str
    cached: bool
    seconds: float


def inputs_digest(image: ImageSpec) -> str:
    """The cache key: every input that shapes the image, and the composing imgbase."""
    fields = asdict(image)
    fields.pop("path")
    fields["layers"] = [(layer.name, layer.digest()) for layer in image.layers]
    fields["imgbase"] = debpkg.source_digest()
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def preflight(image: ImageSpec, backend: ComposerBackend, outdir: Path, cache: Path) -> None:
    """Refuse before anything is written."""
    backend.check_image(image)
    if backend.runs_here is not None:
        die(f"the {backend.name} backend does not compose on this machine: {backend.runs_here}",
            hint="imgbase compose --list-backends shows which backends run here")
    missing = backend.missing_tools()
    if shutil.which("mksquashfs") is None:
        missing.append(("mksquashfs", "squashfs-tools"))
    if missing:
        tool, pkg = missing[0]
        die(f"{tool} is not installed (needed by the {backend.name} backend)",
            hint=f"apt-get install {' '.join(sorted({p for _, p in missing}))} (or run make setup)")
    if os.geteuid() != 0:
        die("compose must run as root (it installs packages into a root tree)",
            hint="run it with sudo")
    for path, need, what in ((outdir, OUT_MIN_FREE, "output"), (cache, WORK_MIN_FREE, "cache")):
        parent = _existing_parent(path)
        if not parent.is_dir():
            die(f"{what} directory {path} is not a directory ({parent} is a file)",
                hint="choose another directory with -o / --cache")
        if path.exists() and not path.is_dir():
            die(f"{what} directory {path} exists and is not a directory",
                hint="choose another directory")
        if not os.access(parent, os.W_OK) or _readonly(parent):
            die(f"{what} directory {path} is not writable", hint="choose a writable directory")
        free = _free(parent)
        if free < need:
            die(f"not enough free space for the {what} in {parent}: "
                f"{free / GIB:.1f} GiB free, {need / GIB:.1f} GiB needed",
                hint="free some space or choose another directory")


def _readonly(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _publish(src_dir: Path, nvr: str, outdir: Path) -> None:
    """Hard-link (or copy) the artifacts into outdir, each by atomic rename."""
    outdir.mkdir(parents=True, exist_ok=True)
    for suffix in ARTIFACTS:
        src, dst = src_dir / f"{nvr}{suffix}", outdir / f"{nvr}{suffix}"
        tmp = outdir / f".{nvr}{suffix}.tmp-{os.getpid()}"
        try:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)


def compose_image(
    image: ImageSpec,
    outdir: Path,
    *,
    progress: Progress,
    cache: Path = DEFAULT_CACHE,
    rebuild: bool = False,
) -> ComposeResult:
    backend = ComposerBackend.get(image.backend)
    outdir = outdir.resolve()
    cache = cache.resolve()
    preflight(image, backend, outdir, cache)
    nvr = str(image.nvr)
    key = inputs_digest(image)
    entry = cache / "images" / key
    progress.emit("compose-start", nvr=nvr, inputs_digest=key, backend=backend.name)

    with _locked(cache):
        if entry.is_dir() and not rebuild:
            with progress.step("cache") as info:
                _publish(entry, nvr, outdir)
                info["detail"] = f"unchanged inputs: reused {entry}"
            return _result(nvr, outdir, cached=True, progress=progress)

        work = cache / "work" / f"{key[:16]}.{os.getpid()}"
        remove_tree(work)
        work.mkdir(parents=True)
        outdir.mkdir(parents=True, exist_ok=True)
        logfile = outdir / f"{nvr}.compose.log"
        logfile.unlink(missing_ok=True)
        progress.open_log(logfile)
        try:
            _build(image, backend, work, cache, logfile, progress, key, rebuild)
            staged = work / "out"
            tmp_entry = entry.with_name(f"{key}.tmp-{os.getpid()}")
            remove_tree(tmp_entry)
            shutil.move(staged, tmp_entry)
            if entry.exists():
                remove_tree(entry)
            os.replace(tmp_entry, entry)
            _publish(entry, nvr, outdir)
        finally:
            remove_tree(work)
            progress.close_log()
    return _result(nvr, outdir, cached=False, progress=progress)


def _result(nvr: str, outdir: Path, *, cached: bool, progress: Progress) -> ComposeResult:
    sq = outdir / f"{nvr}.squashfs"
    digest = (outdir / f"{nvr}.sha256").read_text().split()[0]
    result = ComposeResult(nvr, sq, outdir / f"{nvr}.manifest.json", digest, cached,
                           progress.elapsed())
    progress.emit("result", nvr=nvr, squashfs=str(sq), manifest=str(result.manifest),
                  sha256=digest, cached=cached, seconds=result.seconds)
    return result


def _build(image: ImageSpec, backend: ComposerBackend, work: Path, cache: Path, logfile: Path,
           progress: Progress, key: str, rebuild: bool = False) -> None:
    tree, staged = work / "tree", work / "out"
    staged.mkdir()
    local: tuple[Path, ...] = ()
    if any(layer.imgbase_package for layer in image.layers):
        with progress.step("imgbase-deb") as info:
            local = (debpkg.build_deb(work, image.source_date_epoch),)
            info["detail"] = local[0].name
    ctx = BuildContext(image=image, workdir=work, cache_dir=cache, logfile=logfile,
                       progress=progress, local_packages=local)

    # a backend that applies the layers itself (lorax) makes a tree that is more than
    # its packages: built in place, not kept
    trees, tkey = cache / "trees", treecache.tree_digest(image, backend.name)
    lower, remover = None, None
    with progress.step("packages") as info:
        info["detail"] = f"{len(image.packages)} requested"
        if backend.applies_layers:
            backend.build_tree(ctx, tree)
        elif not rebuild and (lower := treecache.lookup(trees, tkey)):
            info["detail"] += f"; the tree {tkey[:12]} reused"
        else:
            backend.build_tree(ctx, work / "packages")
            lower, remover = treecache.store(trees, tkey, work / "packages",
                                             image.source_date_epoch)
    try:
        with contextlib.ExitStack() as stack:
            if lower:
                stack.enter_context(treecache.overlay(lower, work, tree))
            _finish(ctx, backend, tree, staged, key)
    finally:
        if remover:
            remover.join()


def _finish(ctx: BuildContext, backend: ComposerBackend, tree: Path, staged: Path,
            key: str) -> None:
    """Layers, checks, post-processing, squashfs and manifest, on the package tree."""
    image, progress = ctx.image, ctx.progress
    with api_filesystems(tree):
        for layer in image.layers:
            if backend.applies_layers:  # e.g. lorax: the build kickstart's %post did
                continue
            with progress.step(f"layer:{layer.name}") as info:
                n = postprocess.apply_files(tree, layer)
                postprocess.run_hooks(tree, layer, image, ctx.env)
                postprocess.apply_services(tree, layer)
                info["detail"] = f"{n} files, {len(layer.hooks)} hooks"
        if image.kernel_modules_exclude:
            with progress.step("kernel-modules") as info:
                gone = postprocess.drop_kernel_modules(tree, image.kernel_modules_exclude)
                info["detail"] = (f"{gone / 1e6:.0f} MB left out: "
                                  + ", ".join(image.kernel_modules_exclude))
        with progress.step("boot-check") as info:
            kernels: list[str] = []
            if image.bootable:
                live = any(layer.imgbase_package for layer in image.layers)
                kernels = postprocess.check_boot_files(tree, live)
            info["detail"] = ("kernels " + " ".join(kernels) if image.bootable
                              else "skipped: bootable = false")

    with progress.step("postprocess"):
        packages = backend.installed_packages(tree)
        postprocess.write_image_json(tree, image, key)
        postprocess.scrub(tree)
        postprocess.move_package_db(tree, backend.package_db_paths())
        postprocess.factory_etc(tree)
        postprocess.clamp_mtimes(tree, image.source_date_epoch)
        # last: it lists every other path as it will stay
        size, entries = filelist.totals(filelist.write_listing(tree))

    nvr = str(image.nvr)
    sq = staged / f"{nvr}.squashfs"
    with progress.step("squashfs") as info:
        make_squashfs(tree, sq, image.compression, image.compression_level,
                      image.source_date_epoch)
        digest = sha256_file(sq)
        level = f"{image.compression}-{image.compression_level}"
        info["detail"] = f"{sq.stat().st_size / 1e6:.0f} MB, {level}"

    manifest = {
        **postprocess.identity(image, key),
        "backend": backend.name,
        "kernels": kernels,
        "layers": [{"name": layer.name, "digest": layer.digest(),
                    "packages": list(layer.all_packages)} for layer in image.layers],
        "packages": [asdict(p) for p in packages],
        "tree": {"size": size, "entries": entries},
        "squashfs": {"file": sq.name, "size": sq.stat().st_size, "sha256": digest,
                     "compression": image.compression, "level": image.compression_level},
    }
    (staged / f"{nvr}.manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (staged / f"{nvr}.sha256").write_text(f"{digest}  {sq.name}\n")
    (staged / f"{nvr}.squashfs.sha256").write_text(f"{digest}  {sq.name}\n")


def explain_diff(a: Path, b: Path) -> list[str]:
    """Names of files whose metadata or contents differ between two squashfs images."""
    for p in (a, b):
        if not p.is_file():
            die(f"{p}: no such image", hint="give two .squashfs files")
    base = Path(os.environ.get("TMPDIR", "/var/tmp")) / f"imgbase-diff.{os.getpid()}"
    base.mkdir(parents=True)
    try:
        listings = []
        for i, img in enumerate((a, b)):
            d = base / str(i)
            squashfs.unpack(img, d)
            listings.append(_catalog(d))
        la, lb = listings
        return sorted(k for k in la.keys() | lb.keys() if la.get(k) != lb.get(k))
    finally:
        remove_tree(base)


def _catalog(root: Path) -> dict[str, tuple[object, ...]]:
    cat: dict[str, tuple[object, ...]] = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        rel = "/" + p.relative_to(root).as_posix().lstrip(".")
        content: object = None
        if p.is_symlink():
            content = os.readlink(p)
        elif p.is_file():
            content = sha256_file(p)
        cat[rel] = (st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime), content)
    return cat
