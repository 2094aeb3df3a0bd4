#!/usr/bin/env python3
"""bench/compose: imgbase compose vs the raw floor it drives, alternating, warm cache.

The floor is plain mmdebstrap of the same package set (the same imgbase .deb
included, apt downloads from the same cache) followed by mksquashfs at the
same level. Also times an unchanged recompose (served from the image cache).
Prints a table and writes bench/results/compose.json.

    python bench/compose.py [--runs N]      (root; ~3 min per run pair)
"""

from __future__ import annotations

import argparse
import json
import os
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
from imgbase.spec import load_image  # noqa: E402

IMAGE = ROOT / "images/node.toml"


def timed(argv: list[str], **kw: object) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    return time.monotonic() - t0


def imgbase_compose(out: Path, rebuild: bool) -> float:
    argv = [sys.executable, "-m", "imgbase", "compose", str(IMAGE), "-o", str(out)]
    return timed(argv + (["--rebuild"] if rebuild else []), cwd=ROOT)


def floor(work: Path) -> tuple[float, int]:
    image = load_image(IMAGE)
    deb = debpkg.build_deb(work, image.source_date_epoch)
    apt_cache = DEFAULT_CACHE / "apt-archives"
    tree, sq = work / "tree", work / "floor.squashfs"
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
    subprocess.run(["mksquashfs", str(tree), str(sq), "-noappend", "-no-progress", "-quiet",
                    "-comp", image.compression, "-Xcompression-level",
                    str(image.compression_level)], check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - t0
    size = sq.stat().st_size
    remove_tree(tree)
    sq.unlink()
    return seconds, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/compose must run as root")
    rows: dict[str, list[float]] = {"imgbase": [], "floor": [], "recompose": []}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        imgbase_compose(work / "warm", rebuild=False)  # warm the apt cache
        for i in range(args.runs):
            out = work / f"img{i}"
            rows["imgbase"].append(imgbase_compose(out, rebuild=True))
            sizes["imgbase"] = next(out.glob("*.squashfs")).stat().st_size
            remove_tree(out)
            seconds, sizes["floor"] = floor(work)
            rows["floor"].append(seconds)
            rows["recompose"].append(imgbase_compose(work / f"re{i}", rebuild=False))
            remove_tree(work / f"re{i}")
            print(f"run {i + 1}: imgbase {rows['imgbase'][-1]:.1f}s  floor {seconds:.1f}s  "
                  f"recompose {rows['recompose'][-1]:.2f}s", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["imgbase"] / med["floor"]
    print("\n| what | median s | runs | squashfs MB |")
    print("|---|---|---|---|")
    for k in ("imgbase", "floor", "recompose"):
        size = f"{sizes[k] / 1e6:.0f}" if k in sizes else ""
        print(f"| {k} | {med[k]:.2f} | {len(rows[k])} | {size} |")
    print(f"\nratio imgbase/floor: {ratio:.3f} (goal <= 1.10); "
          f"unchanged recompose: {med['recompose']:.2f}s (goal < 5 s)")
    results = ROOT / "bench/results"
    results.mkdir(exist_ok=True)
    (results / "compose.json").write_text(json.dumps(
        {"runs": rows, "median": med, "ratio": ratio, "squashfs_bytes": sizes}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
