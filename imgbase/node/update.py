"""`imgbase update SOURCE`: a new base and layer from an image, the node's state carried.

Facts first, every refusal before anything is written: ``SOURCE.sha256``'s signature is
good by a key in /etc/imgbase/trusted.d, then the image is copied into a root-only
directory and its sha256 checked on the way (:mod:`imgbase.image.trust`; unsigned only with
``--insecure`` where imgbase.toml allows it); from there on only that verified copy is
read. It is an imgbase image of the same product, newer than every base and than the
newest image the node has ever accepted (``/var/lib/imgbase/accepted.json``; or
``--allow-downgrade``; the same NVR exits 77, "already up to date"), and pool (data:
the bytes of the files that differ, from the two images' file listings; metadata) and
/boot have room. The verified copy is removed when the update ends, done or not.

The new base is a thin snapshot of the closest existing base, synced from the mounted
squashfs (:mod:`imgbase.node.treesync`: the two images' file listings say which paths differ,
rsync copies those with contents, modes, owners, xattrs and hard links, and deletes what
is gone), so its cost follows the change, not the image; with no base to start from it
is a full unpack. The new layer gets /etc merged three ways (:mod:`imgbase.node.etcmerge`), an fstab
from the volume tags, the kernel arguments of the booted layer plus the new image's,
and its boot entry. Last, one grubenv write makes it the default on trial: the next
boot is counted, and a layer that does not come up healthy is abandoned by GRUB.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import bootloader
from ..bootloader import efi, grubenv
from ..errors import ImgbaseError, die
from ..image import fetch, squashfs
from ..image.naming import Layer, Nvr
from ..image.trust import (
    Verdict,
    Verified,
    accepted_step,
    check_insecure,
    read_accepted,
    refuse_rollback,
    verified_copy,
    with_key,
)
from ..plan import Plan, Step, locked
from ..progress import Progress
from ..storage.layout import (
    TAG_INCOMPLETE,
    WORK,
    base_from_image_steps,
    base_seal_steps,
    layer_create_steps,
    layer_finish_steps,
    mountpoint_of,
    rewrite_fstab,
)
from ..storage.lvm import TAG_BASE
from .boot import DEFAULT_TRIES, trial_env
from .facts import NodeFacts
from .kargs import model_args
from .layers import needs_rescue, rescue_add_steps

EXIT_UP_TO_DATE = 77
BASE_SIZE = "8G"
METADATA_MAX = 90.0  # % of the pool's metadata in use above which an update is refused


class UpToDate(ImgbaseError):
    exit_code = EXIT_UP_TO_DATE


@dataclass(frozen=True)
class UpdateFacts:
    node: NodeFacts
    image: str
    nvr: str
    image_kargs: tuple[str, ...]
    origin: str | None  # the base to snapshot; None: a full unpack
    fstab: str  # the booted layer's
    tries: int = DEFAULT_TRIES
    stage_only: bool = False  # leave the default alone: the agent switches at its reboot
    verdict: Verdict = Verdict("not checked", "not checked")
    key: str | None = None  # the image's signing key: tagged on the new base
    accepted: tuple[tuple[str, str], ...] = ()  # the anti-rollback record, raised at the end
    need: int = 0  # bytes the new base writes into the pool (estimate)
    esp_chain: bool = True  # the image has shim and signed grub for the ESP


def merge_kargs(carried: str, image_args: tuple[str, ...]) -> str:
    """The booted layer's arguments, plus the new image's that are not set yet (by key).

    >>> merge_kargs("rw console=ttyS0 quiet", ("console=tty1", "mitigations=auto"))
    'rw console=ttyS0 quiet mitigations=auto'
    """
    args = carried.split()
    keys = {a.split("=", 1)[0] for a in args}
    return " ".join(args + [a for a in image_args if a.split("=", 1)[0] not in keys])


def plan_update(f: UpdateFacts) -> Plan:
    node, layout = f.node, f.node.layout
    vg, nvr = layout.vg, f.nvr
    layer = str(Layer(Nvr.parse(nvr), 1))
    base_mnt, img_mnt, mnt = WORK / "update-base", WORK / "update-image", WORK / "update-layer"
    pool = layout.pool.name if layout.pool else "pool"
    if f.origin is None:
        steps = base_from_image_steps(vg, nvr, f.image, BASE_SIZE, base_mnt, pool)
    else:
        steps = [
            Step("base-snapshot", ("lvcreate", "-y", "-s", "-kn", "-prw", "--addtag", TAG_BASE,
                                   "--addtag", "imgbase:incomplete", "-n", nvr,
                                   f"{vg}/{f.origin}"),
                 note=f"delta: starts as {f.origin}, only the changes are written (created "
                      "active: -kn)"),
            Step("base-sync", (sys.executable, "-P", "-m", "imgbase.node.treesync", str(img_mnt),
                               str(base_mnt), "--mount", f.image, f"/dev/{vg}/{nvr}"),
                 note="mounts both, then copies only the paths whose lines differ in the "
                      "two images' file listings"),
            *base_seal_steps(vg, nvr),
        ]
    steps = with_key(steps, vg, nvr, f.key)
    volumes = [(mp, lv.path) for lv in layout.volumes if (mp := mountpoint_of(lv))]
    create = layer_create_steps(vg, nvr, layer, mnt,
                                rewrite_fstab(f.fstab, f"/dev/{vg}/{layer}", volumes))
    fstab_at = [s.name for s in create].index("layer-fstab")
    steps += create[:fstab_at]
    # this very imgbase (the new image's, when an update package runs it), not /usr/bin's
    steps.append(Step("etc-merge", (sys.executable, "-P", "-m", "imgbase.node.etcmerge",
                                    "/usr/share/factory/etc", "/etc",
                                    f"{mnt}/usr/share/factory/etc", f"{mnt}/etc"),
                      note="3-way: old factory, this layer's /etc, new factory"))
    steps += create[fstab_at:]
    model = node.booted if node.booted in node.entries else node.default
    kargs = merge_kargs(model_args(node, model), f.image_kargs)
    steps += [
        bootloader.kernel_files_step(mnt, node.boot, layer),
        # the new base's rescue entry: its kernel copied apart from the layer's
        *rescue_add_steps(node, mnt, nvr),
        # the new image's shim and grub on imgbase's ESP (an image without them leaves it):
        # only the files that differ, each written new and renamed over the old. Before the
        # trial, also when staged: the chain is Debian's signed binaries, and GRUB's
        # fallback starts the older layers' kernels from the newer grub
        *(efi.sync_steps(node.boot / "efi", mnt, node.esp_boot_uuid, nvr)
          if node.esp_boot_uuid and f.esp_chain else []),
        *bootloader.write_entry_steps(node.boot, node.entries, {
            layer: bootloader.entry(node.boot, layer, f"/dev/{vg}/{layer}", kargs)}),
        *layer_finish_steps(vg, layer, mnt),
        accepted_step(dict(f.accepted), Nvr.parse(nvr)),
    ]
    if not f.stage_only:
        env = trial_env(node.env, layer, f.tries, node.booted or node.default or "")
        steps.append(Step("boot-default", write=(str(node.boot / "grub/grubenv"),
                                                 grubenv.render(env)),
                          note="the last step: from here the next boot tries the new layer"))
    return Plan("update", tuple(bootloader.committed(node.boot, steps)),
                meta=(("base", nvr), ("layer", layer), ("tries", str(f.tries)),
                      ("stage_only", "1" if f.stage_only else "")))


# -- facts -----------------------------------------------------------------------------



def _size(path: str) -> int:
    """Bytes of a file or a block device."""
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def listing_sizes(text: str) -> dict[str, int]:
    """Bytes per listing line of an image's file listing (filelist: size is field 7).

    >>> listing_sizes("# header\\netc/a\\tf\\t644\\t0\\t0\\t1\\t300\\tx\\t-\\t-\\n")
    {'etc/a\\tf\\t644\\t0\\t0\\t1\\t300\\tx\\t-\\t-': 300}
    """
    sizes = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if line.startswith("#") or len(fields) < 7:
            continue
        sizes[line] = int(fields[6]) if fields[6].isdigit() else 0
    return sizes


def space_needed(new_listing: str | None, old_listing: str | None, image_size: int) -> int:
    """Bytes the new base writes: the files whose listing lines differ (a delta), or all
    of them (a full unpack), plus 10 % for the filesystem's own blocks. Without a listing:
    three times the compressed image.

    >>> line = "\\t".join(("a", "f", "644", "0", "0", "1", "{}", "d", "-", "-"))
    >>> space_needed(line.format(1000), None, 10)
    1100
    >>> space_needed(line.format(1000) + "\\n" + line.format(50).replace("a", "b", 1),
    ...              line.format(1000), 10)
    55
    """
    if new_listing is None:
        return image_size * 3
    new = listing_sizes(new_listing)
    old = set(listing_sizes(old_listing)) if old_listing is not None else set()
    return sum(size for line, size in new.items() if line not in old) * 11 // 10


def _listing_of_image(image: str) -> str | None:
    from ..image.filelist import LISTING

    return squashfs.cat(image, LISTING)


def check_pool_space(pool: Any, need: int) -> None:
    free = int(pool.size * (100 - (pool.data_percent or 0)) / 100)
    if free < need:
        die(f"the pool is too full for the update: {free >> 20} MiB free, about {need >> 20} "
            "MiB needed", hint="imgbase gc, or grow the pool (lvextend)")
    meta = pool.metadata_percent or 0
    if meta >= METADATA_MAX:
        die(f"the pool's metadata is {meta}% full (an update needs it below "
            f"{METADATA_MAX:.0f}%)",
            hint="imgbase gc, or grow the pool's metadata (lvextend --poolmetadatasize)")


def gather_facts(image: Verified, *, allow_downgrade: bool, tries: int,
                 full_copy: bool = False, stage_only: bool = False) -> UpdateFacts:
    """image: what trust.verified_copy returned; nothing else of the image is read."""
    node = NodeFacts.gather()
    node.need_boot()  # else the update "succeeds" into the root's /boot, unseen by GRUB
    path = str(image.path)
    new = Nvr.parse(image.nvr)
    # a base still being made (an update cut short: recover removes it) is no base yet
    bases = sorted(Nvr.parse(lv.name) for lv in node.layout.bases
                   if TAG_INCOMPLETE not in lv.tags)
    same_product = [b for b in bases if b.name == new.name]
    if bases and not same_product:
        die(f"{image.nvr} is an image of another product than this node's "
            f"({', '.join(str(b) for b in bases)})", hint="update from an image of this product")
    if any(b == new for b in bases):
        raise UpToDate(f"{new} is already on this node", hint="nothing to do")
    newest = same_product[-1] if same_product else None
    if newest is not None and new < newest and not allow_downgrade:
        die(f"{new} is older than {newest}", hint="pass --allow-downgrade to go back anyway")
    accepted = read_accepted()
    refuse_rollback(new, accepted, allow_downgrade)
    origin = None if full_copy else max((b for b in same_product if b < new), default=newest)
    pool = node.layout.pool
    if pool is None:
        die("no thin pool tagged imgbase:pool", hint="imgbase check tells what is wrong")
    # the old side of a delta: the listing of the booted root, when it is the origin's
    from ..image.filelist import LISTING

    old_listing = None
    if origin is not None and str(origin) == node.booted_base:
        old_path = Path("/") / LISTING
        old_listing = old_path.read_text(errors="replace") if old_path.is_file() else None
    new_listing = _listing_of_image(path)
    if origin is not None and old_listing is None:
        old_listing = ""  # origin not readable here: count every file (an upper bound)
    need = space_needed(new_listing, old_listing if origin is not None else None,
                        _size(path))
    check_pool_space(pool, need)
    from .layers import check_boot_space

    check_boot_space(node.boot, node.booted or node.default,
                     copies=2 if needs_rescue(node, str(new)) else 1)  # layer, rescue
    return UpdateFacts(node=node, image=path, nvr=str(new), image_kargs=image.kernel_args,
                       origin=str(origin) if origin else None,
                       fstab=Path("/etc/fstab").read_text(), tries=tries,
                       verdict=image.verdict, stage_only=stage_only, key=image.key,
                       accepted=tuple(sorted(accepted.items())), need=need,
                       esp_chain=efi.image_has_chain(path))


# -- the "what will change" report (--check) ---------------------------------------------

def packages(status_text: str) -> dict[str, str]:
    """Installed packages and versions from a dpkg status file.

    >>> packages("Package: a\\nStatus: install ok installed\\nVersion: 1\\n\\n"
    ...          "Package: b\\nStatus: deinstall ok config-files\\nVersion: 2\\n")
    {'a': '1'}
    """
    found = {}
    for stanza in status_text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            found[fields["Package"]] = fields.get("Version", "")
    return found


def package_diff(old: dict[str, str], new: dict[str, str]) -> dict[str, Any]:
    """Added, removed and changed (old → new version) packages.

    >>> package_diff({"a": "1", "b": "1"}, {"b": "2", "c": "1"})
    {'added': ['c'], 'removed': ['a'], 'changed': {'b': ['1', '2']}}
    """
    return {"added": sorted(set(new) - set(old)), "removed": sorted(set(old) - set(new)),
            "changed": {p: [old[p], new[p]] for p in sorted(set(old) & set(new))
                        if old[p] != new[p]}}


def check_report(f: UpdateFacts, workdir: Path, root: Path = Path("/")) -> dict[str, Any]:
    """What the update would change, without changing anything: packages, the /etc merge
    (run on scratch copies), kernel arguments, space. root: the booted layer's tree."""
    import shutil
    import tempfile

    from .etcmerge import merge

    status_path = "usr/lib/sysimage/dpkg/status"
    old = packages((root / status_path).read_text(errors="replace"))
    new_status = squashfs.cat(f.image, status_path) or ""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        scratch = Path(tmp)
        squashfs.unpack(f.image, scratch / "new", "usr/share/factory/etc")
        factory = scratch / "new/usr/share/factory/etc"
        shutil.copytree(factory, scratch / "target", symlinks=True)
        report = merge(root / "usr/share/factory/etc", root / "etc", factory,
                       scratch / "target")
    node = f.node
    model = node.entries.get(node.booted or "") or ""
    pool = node.layout.pool
    return {
        "from": node.booted_base, "to": f.nvr, "delta_from": f.origin,
        "checksum": f.verdict.checksum, "signature": f.verdict.signature,
        "packages": package_diff(old, packages(new_status)),
        "etc": {"taken_new": report.taken_new, "kept_local": report.kept_local,
                "removed": report.removed, "conflicts": report.conflicts,
                "accounts_kept": report.accounts_kept},
        "kargs": merge_kargs(bootloader.kernel_args(model) if model else "rw",
                             f.image_kargs).split(),
        "pool_free": None if pool is None else
        int(pool.size * (100 - (pool.data_percent or 0)) / 100),
        "image_size": _size(f.image), "space_needed": f.need,
    }


def render_report(r: dict[str, Any]) -> str:
    pk, etc = r["packages"], r["etc"]
    lines = [f"update {r['from']} -> {r['to']}"
             + (f" (a delta of base {r['delta_from']})" if r["delta_from"] else " (full copy)"),
             f"image: checksum {r['checksum']}, {r['signature']}",
             f"packages: {len(pk['added'])} added, {len(pk['removed'])} removed, "
             f"{len(pk['changed'])} changed"]
    lines += [f"  {p}: {a} -> {b}" for p, (a, b) in list(pk["changed"].items())[:20]]
    lines += [f"  + {p}" for p in pk["added"][:20]] + [f"  - {p}" for p in pk["removed"][:20]]
    lines.append(f"/etc: {len(etc['taken_new'])} from the image, {len(etc['kept_local'])} "
                 f"kept local, {len(etc['removed'])} removed, {len(etc['conflicts'])} "
                 "conflicts (kept local)")
    lines += [f"  conflict: /etc/{c}" for c in etc["conflicts"]]
    lines.append(f"kernel arguments: {' '.join(r['kargs'])}")
    if r["pool_free"] is not None:
        lines.append(f"pool free {r['pool_free'] >> 20} MiB; the new base needs about "
                     f"{r['space_needed'] >> 20} MiB (image {r['image_size'] >> 20} MiB)")
    return "\n".join(lines)


@contextlib.contextmanager
def prepared(source: str, *, insecure: bool, allow_downgrade: bool, tries: int,
             full_copy: bool = False, stage_only: bool = False,
             progress: Progress | None = None) -> Iterator[tuple[UpdateFacts, Plan]]:
    """``imgbase update``'s work before the plan runs: a URL downloaded, the image verified
    into a private copy, the facts and the plan -- under imgbase's lock; the verified copy
    is discarded when the caller is done (the plan run, or only shown)."""
    check_insecure(insecure)
    with locked():
        adopt = None
        if fetch.is_url(source):
            source = str(fetch.fetch(source, progress or Progress(), insecure=insecure))
            adopt = fetch.DOWNLOADS  # root-only: the download is renamed, not copied
        image = verified_copy(source, insecure=insecure, adopt=adopt)
        try:
            facts = gather_facts(image, allow_downgrade=allow_downgrade, tries=tries,
                                 full_copy=full_copy, stage_only=stage_only)
            yield facts, plan_update(facts)
        finally:
            image.discard()  # done or failed: the plan needs it no more
