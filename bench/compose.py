#!/usr/bin/env python3
"""bench/compose: imgbase compose vs the raw floor and vs mkosi, alternating, warm cache.

Contenders, each building images/node.toml's package set (every layer's packages,
taken from ``load_image`` so nothing can drift) for Debian bookworm from the
image's mirror, amd64:

* **imgbase** -- ``imgbase compose --rebuild`` (the whole compose: .deb, tree,
  layers, boot check, scrub, reproducible squashfs, manifest).
* **floor** -- plain ``mmdebstrap --variant=minbase`` of the same packages and the
  same imgbase .deb, then mksquashfs at the image's level (zstd-3).
* **mkosi** -- the mkosi of this Debian (``apt-get install mkosi``: 14), config
  generated in the work directory from the image spec: ``Format=directory``,
  ``BasePackages=no`` (no packages of mkosi's own choosing), ``WithDocs=yes``
  (mmdebstrap keeps /usr/share/doc, so do we), ``Bootable=no`` (no dracut, no
  UKI: the boot files come from the packages as on the other sides),
  ``RemoveFiles=`` the apt lists and caches (mmdebstrap's cleanup removes them), a
  ``FinalizeScript=`` making the initramfs (mkosi 14 runs apt with INITRD=No), then the
  very same mksquashfs command as the floor -- mkosi's own ``plain_squashfs``
  runs the same mksquashfs but only at zstd's default level 15, so the tree is
  squashed outside it at zstd-3. The imgbase .deb is installed too: mkosi 14
  hands ``Packages=`` to apt running outside the tree with dpkg chrooted into it,
  so a path to a .deb cannot work; the .deb is served from a one-package flat
  repository (``copy:`` URI, ``[trusted=yes]``) added by a skeleton tree, which
  also points the security suite at the image's ``security_mirror`` (mkosi 14
  hard-codes https://security.debian.org). mkosi 14 bootstraps with debootstrap
  (minbase: Priority required, where mmdebstrap takes Essential) and then runs
  ``apt-get install``; that is what mkosi costs here, as it is. The trees' package
  lists are compared with the floor's (printed, and "package_diff" in the JSON): mkosi's
  debootstrap --merged-usr takes usr-is-merged where mmdebstrap's apt takes usrmerge
  (and with it perl), otherwise the sets are the same.
* **recompose** -- an unchanged ``imgbase compose`` (served from the image cache).
* **site change** -- ``imgbase compose`` of the same image with a file of its site layer
  changed (a new image): it starts from the package tree the ``--rebuild`` above kept
  in the cache, instead of installing every package again.

Warm cache for all: before the first run imgbase composes once (apt cache
$IMGBASE_CACHE/apt-archives, also the floor's), and mkosi's package cache
(``Cache=$IMGBASE_CACHE/mkosi-cache``, bind-mounted by mkosi at the tree's
/var/cache/apt/archives for debootstrap and apt) is seeded with hard links from
it and filled by one untimed mkosi build (skipped while its stamp matches the
package set). Index downloads (apt update) still happen in every contender.
The order of the three builds rotates from run to run; ratios are taken within
each run and their median reported. Prints a table and writes
bench/results/compose.json. If mkosi is missing or cannot build here, the bench
says "mkosi: unavailable (<reason>)" and times the others.

    python bench/compose.py [--runs N]             (root; ~4 min per run)
    python bench/compose.py --mkosi-smoke less,systemd,systemd-resolved  (mkosi alone)

(mkosi 14 assumes systemd in a Debian tree: it writes /etc/kernel/install.d and, when
systemd is asked for, enables systemd-resolved; a smoke set must have both.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imgbase.compose import debpkg  # noqa: E402
from imgbase.compose.build import DEFAULT_CACHE  # noqa: E402
from imgbase.compose.chroot import remove_tree  # noqa: E402
from imgbase.image.spec import ImageSpec, load_image  # noqa: E402

IMAGE = ROOT / "images/node.toml"
MKOSI_CACHE = DEFAULT_CACHE / "mkosi-cache"
MKOSI_ARCH = {"amd64": "x86_64", "arm64": "aarch64", "i386": "x86", "ppc64el": "ppc64-le"}
LOCAL_LIST = "etc/apt/sources.list.d/imgbase-local.list"
# mkosi 14 runs apt with INITRD=No (it expects dracut/kernel-install for bootable images),
# so linux-image's postinst makes no initramfs; mmdebstrap's apt does, and imgbase needs
# it: make it here, as the kernel's postinst would have, in the host namespace mkosi
# detached (mount --make-rslave /), so these mounts stay inside it.
FINALIZE = """#!/bin/sh
set -e
[ "$1" = final ] || exit 0
ls "$BUILDROOT"/boot/vmlinuz-* >/dev/null 2>&1 || exit 0
mount -t proc proc "$BUILDROOT/proc"
mount -t sysfs sysfs "$BUILDROOT/sys"
mount --bind /dev "$BUILDROOT/dev"
trap 'umount "$BUILDROOT/dev" "$BUILDROOT/sys" "$BUILDROOT/proc"' EXIT
chroot "$BUILDROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \\
    update-initramfs -c -k all
"""


class Unavailable(Exception):
    """mkosi cannot build on this machine; the message says why."""


def timed(argv: list[str], **kw: object) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    return time.monotonic() - t0


def site_change_compose(work: Path, i: int) -> float:
    """images/ and layers/ copied, a site layer file changed: a new image, same packages.

    The change is new on every call (an image cached by an earlier bench would be
    timed as a recompose), and the compose's events must show a new image built on
    the kept package tree, or the bench stops."""
    for part in ("images", "layers"):
        shutil.copytree(ROOT / part, work / part)
    (work / "layers/site/files/etc/imgbase-bench-site").write_text(
        f"site change {i} {time.time_ns()}\n")
    argv = [sys.executable, "-m", "imgbase", "compose", str(work / "images/node.toml"),
            "-o", str(work / "out"), "--json"]
    t0 = time.monotonic()
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT).stdout
    seconds = time.monotonic() - t0
    events = [json.loads(line) for line in out.splitlines()]
    packages = [e for e in events if e["event"] == "step-done" and e["step"] == "packages"]
    if not packages or "reused" not in packages[0].get("detail", ""):
        sys.exit(f"bench/compose: the site change did not compose on the kept tree: {packages}")
    return seconds


def imgbase_compose(out: Path, rebuild: bool) -> float:
    argv = [sys.executable, "-m", "imgbase", "compose", str(IMAGE), "-o", str(out)]
    return timed(argv + (["--rebuild"] if rebuild else []), cwd=ROOT)


def squash(image: ImageSpec, tree: Path, sq: Path) -> int:
    """The floor's and mkosi's squashfs step (one command for both); returns its size."""
    subprocess.run(["mksquashfs", str(tree), str(sq), "-noappend", "-no-progress", "-quiet",
                    "-comp", image.compression, "-Xcompression-level",
                    str(image.compression_level)], check=True, stdout=subprocess.DEVNULL)
    size = sq.stat().st_size
    sq.unlink()
    return size


def installed(tree: Path) -> list[str]:
    """The packages dpkg has installed in a tree (and "initrd.img-*" for each initramfs)."""
    out = subprocess.run(["dpkg-query", f"--admindir={tree}/var/lib/dpkg", "-W",
                          "-f=${db:Status-Abbrev} ${Package}\n"], check=True,
                         capture_output=True, text=True).stdout
    names = sorted(line.split()[1] for line in out.splitlines() if line.startswith("ii"))
    return names + sorted(p.name for p in (tree / "boot").glob("initrd.img-*"))


def floor(work: Path, image: ImageSpec, deb: Path) -> tuple[float, int, list[str]]:
    apt_cache = DEFAULT_CACHE / "apt-archives"
    tree = work / "tree"
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(image.source_date_epoch)}
    t0 = time.monotonic()
    subprocess.run([
        "mmdebstrap", "--mode=root", "--variant=minbase", "--quiet",
        "--include=" + ",".join(image.packages), f"--include={deb}",
        "--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount",
        "--skip=download/empty",
        '--setup-hook=mkdir -p "$1/var/cache/apt/archives"',
        f"--setup-hook=sync-in {apt_cache} /var/cache/apt/archives",
        '--customize-hook=rm -f "$1"/var/cache/apt/archives/*.deb',
        image.suite, str(tree),
        f"deb {image.mirror} {image.suite} main",
        f"deb {image.mirror} {image.suite}-updates main",
        f"deb {image.security_mirror} {image.suite}-security main",
    ], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    size = squash(image, tree, work / "floor.squashfs")
    seconds = time.monotonic() - t0
    names = installed(tree)
    remove_tree(tree)
    return seconds, size, names


# --- mkosi -----------------------------------------------------------------------------


def mkosi_version() -> str:
    """'14' for Debian 12's mkosi; raises Unavailable if there is none."""
    if shutil.which("mkosi") is None:
        raise Unavailable("mkosi is not installed: apt-get install --no-install-recommends mkosi")
    for tool, pkg in (("debootstrap", "debootstrap"), ("mksquashfs", "squashfs-tools"),
                      ("dpkg-scanpackages", "dpkg-dev")):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed: apt-get install {pkg}")
    out = subprocess.run(["mkosi", "--version"], capture_output=True, text=True)
    if out.returncode != 0:
        raise Unavailable(f"mkosi --version failed: {(out.stderr or out.stdout).strip()}")
    return out.stdout.split()[-1]


def local_repo(work: Path, deb: Path) -> Path:
    """A flat apt repository holding only the imgbase .deb."""
    repo = work / "mkosi-repo"
    repo.mkdir(exist_ok=True)
    shutil.copy2(deb, repo / deb.name)
    packages = subprocess.run(["dpkg-scanpackages", "--multiversion", "."], cwd=repo,
                              check=True, capture_output=True, text=True).stdout
    (repo / "Packages").write_text(packages)
    return repo


def mkosi_config(work: Path, image: ImageSpec, packages: list[str], repo: Path | None) -> Path:
    """mkosi.conf (and its skeleton tree) for this package set, in work/mkosi."""
    conf_dir = work / "mkosi"
    remove_tree(conf_dir)
    skeleton = conf_dir / "skeleton"
    lists = skeleton / "etc/apt/sources.list.d"
    lists.mkdir(parents=True)
    # mkosi 14 writes https://security.debian.org here; the other sides use the image's
    (lists / f"{image.suite}-security.list").write_text(
        f"deb {image.security_mirror} {image.suite}-security main\n")
    # what mmdebstrap's cleanup removes (apt lists and caches), so the trees match
    remove = ["/var/lib/apt/lists/*_*", "/var/lib/apt/lists/auxfiles", "/var/cache/apt/*.bin"]
    if repo is not None:
        (skeleton / LOCAL_LIST).write_text(f"deb [trusted=yes] copy:{repo} ./\n")
        remove.append(f"/{LOCAL_LIST}")
    finalize = conf_dir / "mkosi.finalize"
    finalize.write_text(FINALIZE)
    finalize.chmod(0o755)
    content = [f"Packages={','.join(packages)}", "BasePackages=no", "WithDocs=yes",
               f"Cache={MKOSI_CACHE}", f"SkeletonTree={skeleton}",
               f"RemoveFiles={','.join(remove)}", f"FinalizeScript={finalize}"]
    conf = conf_dir / "mkosi.conf"
    conf.write_text("\n".join([
        "[Distribution]", "Distribution=debian", f"Release={image.suite}",
        f"Mirror={image.mirror}",
        f"Architecture={MKOSI_ARCH.get(image.architecture, image.architecture)}",
        "", "[Output]", "Format=directory", f"Output={work / 'mkosi-tree'}",
        f"WorkspaceDirectory={work}", "Bootable=no",
        "", "[Content]", *content, "",
    ]))
    return conf


def mkosi_build(work: Path, image: ImageSpec, conf: Path) -> tuple[float, int, list[str]]:
    """Time mkosi build + the same mksquashfs; (seconds, squashfs bytes, packages)."""
    tree = work / "mkosi-tree"
    log = work / "mkosi.log"
    MKOSI_CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        done = subprocess.run(["mkosi", "--config", str(conf), "build"], cwd=conf.parent,
                              stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        kept = Path("/var/tmp/imgbase-bench-mkosi.log")  # the work directory goes away
        shutil.copyfile(log, kept)
        lines = [ln.strip() for ln in kept.read_text(errors="replace").splitlines() if ln.strip()]
        raise Unavailable(f"mkosi build exited {done.returncode}: "
                          + " | ".join(lines[-3:]) + f" (log {kept})")
    size = squash(image, tree, work / "mkosi.squashfs")
    seconds = time.monotonic() - t0
    names = installed(tree)
    remove_tree(tree)
    for extra in work.glob("mkosi-tree.*"):  # .manifest, .changelog
        extra.unlink()
    return seconds, size, names


def seed_mkosi_cache(image: ImageSpec) -> None:
    """Hard-link the debs imgbase has cached into mkosi's cache (mkosi fills in the rest)."""
    cache = MKOSI_CACHE / f"debian~{image.suite}"  # mkosi 14 adds <distribution>~<release>
    cache.mkdir(parents=True, exist_ok=True)
    for deb in (DEFAULT_CACHE / "apt-archives").glob("*.deb"):
        dst = cache / deb.name
        if not dst.exists():
            try:
                os.link(deb, dst)
            except OSError:
                shutil.copy2(deb, dst)


def mkosi_warm(work: Path, image: ImageSpec, conf: Path, packages: list[str]) -> None:
    """One untimed build unless the cache was already filled for this package set."""
    stamp = MKOSI_CACHE / ".imgbase-bench-warm"
    digest = hashlib.sha256(" ".join(sorted(packages)).encode()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == digest:
        return
    seed_mkosi_cache(image)
    mkosi_build(work, image, conf)
    stamp.write_text(digest + "\n")


def mkosi_smoke(packages: list[str]) -> int:
    """The mkosi path alone on a small package set (plus the imgbase .deb)."""
    image = load_image(IMAGE)
    try:
        version = mkosi_version()
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            work = Path(tmp)
            repo = local_repo(work, debpkg.build_deb(work, image.source_date_epoch))
            conf = mkosi_config(work, image, [*packages, "imgbase"], repo)
            print(conf.read_text())
            seconds, size, names = mkosi_build(work, image, conf)
    except Unavailable as exc:
        print(f"mkosi: unavailable ({exc})")
        return 1
    print(f"mkosi {version}: {seconds:.1f}s, squashfs {size / 1e6:.0f} MB, "
          f"installed: {' '.join(names)}")
    return 0


# --- the bench --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mkosi-smoke", metavar="PKG,...",
                        help="only build these packages (and imgbase) with mkosi, then exit")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/compose must run as root")
    if args.mkosi_smoke:
        return mkosi_smoke([p for p in args.mkosi_smoke.split(",") if p])
    image = load_image(IMAGE)
    packages = [*image.packages, "imgbase"]
    rows: dict[str, list[float]] = {"imgbase": [], "floor": [], "mkosi": [], "recompose": [],
                                    "site change": []}
    sizes: dict[str, int] = {}
    contents: dict[str, list[str]] = {}  # installed packages, initrd.img-* files
    mkosi: dict[str, object] = {"available": False}
    unavailable = ""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        imgbase_compose(work / "warm", rebuild=False)  # warm the apt cache
        deb = debpkg.build_deb(work, image.source_date_epoch)
        try:
            mkosi["version"] = mkosi_version()
            conf = mkosi_config(work, image, packages, local_repo(work, deb))
            mkosi_warm(work, image, conf, packages)
            mkosi["available"] = True
        except Unavailable as exc:
            unavailable = str(exc)
            mkosi["reason"] = unavailable
            print(f"mkosi: unavailable ({unavailable})", flush=True)

        def run_imgbase(i: int) -> None:
            out = work / f"img{i}"
            rows["imgbase"].append(imgbase_compose(out, rebuild=True))
            sizes["imgbase"] = next(out.glob("*.squashfs")).stat().st_size
            manifest = json.loads(next(out.glob("*.manifest.json")).read_text())
            contents["imgbase"] = sorted(p["name"] for p in manifest["packages"])
            contents["imgbase"] += [f"initrd.img-{k}" for k in manifest["kernels"]]
            remove_tree(out)

        def run_floor(i: int) -> None:
            seconds, sizes["floor"], contents["floor"] = floor(work, image, deb)
            rows["floor"].append(seconds)

        def run_mkosi(i: int) -> None:
            nonlocal unavailable
            if not mkosi["available"]:
                return
            try:
                seconds, sizes["mkosi"], contents["mkosi"] = mkosi_build(work, image, conf)
            except Unavailable as exc:  # built in the warm-up, failed now: no figures
                unavailable = mkosi["reason"] = f"run {i + 1}: {exc}"
                mkosi["available"] = False
                rows["mkosi"].clear()
                sizes.pop("mkosi", None)
                contents.pop("mkosi", None)
                print(f"mkosi: unavailable ({unavailable})", flush=True)
                return
            rows["mkosi"].append(seconds)

        contenders = [run_imgbase, run_floor, run_mkosi]
        for i in range(args.runs):
            for run in contenders[i % 3:] + contenders[:i % 3]:
                run(i)
            rows["recompose"].append(imgbase_compose(work / f"re{i}", rebuild=False))
            remove_tree(work / f"re{i}")
            rows["site change"].append(site_change_compose(work / f"site{i}", i))
            remove_tree(work / f"site{i}")
            line = " ".join(f"{k} {rows[k][-1]:.1f}s" for k in ("imgbase", "floor", "mkosi")
                            if len(rows[k]) > i)
            print(f"run {i + 1}: {line}  recompose {rows['recompose'][-1]:.2f}s  "
                  f"site change {rows['site change'][-1]:.1f}s", flush=True)

    rows = {k: v for k, v in rows.items() if v}
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratios = {f"imgbase/{k}": [a / b for a, b in zip(rows["imgbase"], rows[k], strict=True)]
              for k in ("floor", "mkosi") if k in rows}
    ratio_med = {k: statistics.median(v) for k, v in ratios.items()}
    counts = {k: sum(not n.startswith("initrd.img-") for n in v) for k, v in contents.items()}
    initrds = {k: sum(n.startswith("initrd.img-") for n in v) for k, v in contents.items()}
    # what each tree has that the floor's has not, and the other way round
    diff = {k: {"extra": sorted(set(v) - set(contents["floor"])),
                "missing": sorted(set(contents["floor"]) - set(v))}
            for k, v in contents.items() if k != "floor" and "floor" in contents}
    print("\n| what | median s | runs | squashfs MB | packages | initramfs |")
    print("|---|---|---|---|---|---|")
    for k in ("imgbase", "floor", "mkosi", "recompose", "site change"):
        if k not in rows:
            print(f"| {k} | unavailable | 0 | | | |")
            continue
        size = f"{sizes[k] / 1e6:.0f}" if k in sizes else ""
        print(f"| {k} | {med[k]:.2f} | {len(rows[k])} | {size} | {counts.get(k, '')} "
              f"| {initrds.get(k, '')} |")
    for k, d in diff.items():
        if d["extra"] or d["missing"]:
            print(f"{k} vs floor: has {' '.join(d['extra']) or '-'}; "
                  f"lacks {' '.join(d['missing']) or '-'}")
    print(f"\nratio imgbase/floor: {ratio_med['imgbase/floor']:.3f} (goal <= 1.10, median of "
          f"per-run ratios); unchanged recompose: {med['recompose']:.2f}s (goal < 5 s)")
    if "imgbase/mkosi" in ratio_med:
        print(f"ratio imgbase/mkosi {mkosi['version']}: {ratio_med['imgbase/mkosi']:.3f} "
              "(median of per-run ratios)")
    else:
        print(f"mkosi: unavailable ({unavailable})")
    results = ROOT / "bench/results"
    results.mkdir(exist_ok=True)
    (results / "compose.json").write_text(json.dumps({
        "runs": rows, "median": med, "ratio": ratio_med["imgbase/floor"],
        "ratio_mkosi": ratio_med.get("imgbase/mkosi"), "ratios": ratios,
        "squashfs_bytes": sizes, "packages_installed": counts, "package_diff": diff,
        "mkosi": mkosi,
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
