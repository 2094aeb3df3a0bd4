"""Derive a next version of a composed image, for update tests and the update benchmark.

A real v2 compose takes a minute and changes whatever the mirror changed; a derived
v2 changes a known share of files (content rewritten, one file added, one removed, an
/etc file changed by the image) and carries a new NVR in image.json, so tests can say
exactly what an update must do.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from imgbase.image.filelist import write_listing
from imgbase.image.squashfs import make_squashfs, sha256_file
from imgbase.run import run

IMAGE_JSON = "usr/lib/imgbase/image.json"


def derive(v1: Path, out_dir: Path, version: str, *, share: float = 0.01,
           seed: int = 1, alter: Callable[[Path], None] | None = None) -> Path:
    """Write <name>-<version>-1.squashfs (+ .sha256) into out_dir and return it.

    alter: a last change to the unpacked tree (e.g. break its boot) before it is packed."""
    work = out_dir / f"derive-{version}"
    if work.exists():
        shutil.rmtree(work)
    run(["unsquashfs", "-q", "-n", "-d", str(work), str(v1)])
    info = json.loads((work / IMAGE_JSON).read_text())
    nvr = f"{info['name']}-{version}-1"
    info.update(version=version, release="1", nvr=nvr)
    (work / IMAGE_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    files = sorted(p for p in (work / "usr/share").rglob("*")
                   if p.is_file() and not p.is_symlink() and p.stat().st_size > 0)
    rng = random.Random(seed)
    picked = rng.sample(files, max(2, int(len(files) * share)) + 1)
    picked.pop().unlink()  # one file removed
    for path in picked:  # the others changed
        path.write_bytes(path.read_bytes() + f"\n# {nvr}\n".encode())
    (work / f"usr/share/imgbase-{version}.txt").write_text(f"new in {nvr}\n")
    (work / "etc/imgbase-image-version").write_text(f"{nvr}\n")
    factory = work / "usr/share/factory/etc"
    if factory.is_dir():
        shutil.copy2(work / "etc/imgbase-image-version", factory / "imgbase-image-version")
    if alter is not None:
        alter(work)
    write_listing(work)  # as compose does: the update's delta is computed from it
    out = out_dir / f"{nvr}.squashfs"
    make_squashfs(work, out, "zstd", 3, 1767225600)
    Path(f"{out}.sha256").write_text(f"{sha256_file(out)}  {out.name}\n")
    shutil.rmtree(work)
    return out


def signing_key(home: Path, export: Path) -> Path:
    """A fresh OpenPGP signing key in gpg home `home`; its public key exported to `export`."""
    home.mkdir(mode=0o700, parents=True)
    gpg = ["gpg", "--homedir", str(home), "--batch"]
    run([*gpg, "--passphrase", "", "--quick-gen-key", "imgbase test images <test@localhost>",
         "ed25519", "sign", "never"])
    run([*gpg, "--output", str(export), "--export"])
    return home


def stop_agent(home: Path) -> None:
    """gpg starts an agent per home directory: stop it once the keys are used."""
    run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)
