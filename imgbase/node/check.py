"""`imgbase check`: the node's storage and boot health, as checks that can fail.

Facts are gathered once (:func:`gather`), then :func:`run_checks` is pure: each
check looks at the facts and says ok or not, with a detail and a hint. The
limits for pool use come from ``/etc/imgbase/imgbase.toml``::

    [check]
    pool_data_max = 80      # percent
    pool_metadata_max = 80

and can be overridden on the command line.

>>> r = run_checks(CheckFacts(tagged_vgs=("vg",), layout=None))
>>> [(c.name, c.ok) for c in r][:2]
[('vg', True), ('pool', False)]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..bootloader import ENTRIES, efi, uses_bls
from ..bootloader.grub import unrecognised
from ..config import CheckSettings
from ..errors import ImgbaseError
from ..image.naming import Layer, Nvr
from ..run import run
from ..storage import lvm
from ..storage.layout import TAG_INCOMPLETE, NodeLayout, mountpoint_of, require_lvm


@dataclass(frozen=True)
class Mount:
    source: str  # real path of the device
    options: tuple[str, ...]


@dataclass(frozen=True)
class EspFacts:
    """The EFI system partition of a node that has one (fstab mounts /boot/efi, or the
    node was booted by UEFI)."""

    why: str  # why the node needs one
    mounted: bool
    ours: bool = True  # imgbase wrote it (else another system's: left alone, not judged)
    damaged: tuple[str, ...] = ()  # chain files missing or not as the record says
    bad_stubs: tuple[str, ...] = ()  # grub.cfg stubs that do not find this /boot
    chain_of: str | None = None  # the image the record says the chain came from
    booted_base: str | None = None
    differs: tuple[str, ...] = ()  # files that are not the booted image's


@dataclass(frozen=True)
class CheckFacts:
    tagged_vgs: tuple[str, ...]
    layout: NodeLayout | None
    entries: dict[str, str] = field(default_factory=dict)
    boot_files: frozenset[str] = frozenset()  # layers with /boot/<layer>/{vmlinuz,initrd.img}
    entries_junk: str = ""  # text in the entries file that is not an entry
    booted: str | None = None
    mounts: dict[str, Mount] = field(default_factory=dict)
    lv_devices: dict[str, str] = field(default_factory=dict)  # real device path -> LV name
    autoextend: tuple[int, int] | None = None  # (threshold, percent) of the pool's profile
    monitored: bool = False  # dmeventd watches the pool
    limits: CheckSettings = CheckSettings()
    esp: EspFacts | None = None  # None: a BIOS-only node


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    detail: str
    hint: str = ""


CHECKS: list[Callable[[CheckFacts], Result]] = []


def check(func: Callable[[CheckFacts], Result]) -> Callable[[CheckFacts], Result]:
    CHECKS.append(func)
    return func


def _result(name: str, problems: list[str], good: str, hint: str = "") -> Result:
    if problems:
        return Result(name, False, "; ".join(problems), hint)
    return Result(name, True, good)


@check
def check_vg(f: CheckFacts) -> Result:
    if len(f.tagged_vgs) == 1:
        return Result("vg", True, f"volume group {f.tagged_vgs[0]} tagged {lvm.TAG_VG}")
    if not f.tagged_vgs:
        return Result("vg", False, f"no volume group is tagged {lvm.TAG_VG}",
                      "install with imgbase install or adopt with imgbase layout --init")
    return Result("vg", False, f"{len(f.tagged_vgs)} volume groups tagged {lvm.TAG_VG}: "
                  f"{', '.join(f.tagged_vgs)}", f"vgchange --deltag {lvm.TAG_VG} on the stray one")


@check
def check_pool(f: CheckFacts) -> Result:
    pool = f.layout.pool if f.layout else None
    if pool is None:
        return Result("pool", False, f"no thin pool tagged {lvm.TAG_POOL}",
                      f"lvchange --addtag {lvm.TAG_POOL} VG/POOL")
    return Result("pool", True, f"thin pool {pool.vg}/{pool.name}")


@check
def check_bases(f: CheckFacts) -> Result:
    if f.layout is None:
        return Result("bases", False, "no node layout")
    problems = []
    for lv in f.layout.bases:
        try:
            Nvr.parse(lv.name)
        except ImgbaseError:
            problems.append(f"{lv.name}: not an NVR")
        if not lv.read_only:
            problems.append(f"{lv.name}: writable")
        if not lv.skip_activation:
            problems.append(f"{lv.name}: activation not skipped")
        if f.layout.pool and lv.pool != f.layout.pool.name:
            problems.append(f"{lv.name}: not in the pool")
    if not f.layout.bases:
        problems.append("no base")
    return _result("bases", problems, f"{len(f.layout.bases)} base(s), read-only",
                   "lvchange --permission r --setactivationskip y VG/BASE")


@check
def check_layers(f: CheckFacts) -> Result:
    if f.layout is None:
        return Result("layers", False, "no node layout")
    bases = {lv.name for lv in f.layout.bases}
    problems = [f"{lv.name}: not a layer name (<nvr>+<n>)" for lv in f.layout.stray_layers]
    for lv in f.layout.layers:
        if lv.origin not in bases:
            problems.append(f"{lv.name}: its origin {lv.origin or '(none)'} is not a base")
        elif str(Layer.parse(lv.name).nvr) != lv.origin:
            problems.append(f"{lv.name}: named for another base than its origin {lv.origin}")
        if lv.read_only:
            problems.append(f"{lv.name}: read-only")
    if not f.layout.layers:
        problems.append("no layer")
    return _result("layers", problems, f"{len(f.layout.layers)} layer(s), each on its base",
                   f"remove the stray LV or its {lvm.TAG_LAYER} tag")


def _pool_use(f: CheckFacts, which: str, limit: float) -> Result:
    name = f"pool-{which}"
    pool = f.layout.pool if f.layout else None
    if pool is None:
        return Result(name, False, "no thin pool")
    used = pool.data_percent if which == "data" else pool.metadata_percent
    if used is None:
        return Result(name, False, f"{which} use unknown (is the pool active?)")
    if used >= limit:
        return Result(name, False, f"{which} {used:.1f}% used, limit {limit:g}%",
                      "free space: imgbase layer/base --remove, or extend the VG and pool")
    return Result(name, True, f"{which} {used:.1f}% used, limit {limit:g}%")


@check
def check_pool_data(f: CheckFacts) -> Result:
    return _pool_use(f, "data", f.limits.pool_data_max)


@check
def check_pool_metadata(f: CheckFacts) -> Result:
    return _pool_use(f, "metadata", f.limits.pool_metadata_max)


@check
def check_autoextend(f: CheckFacts) -> Result:
    problems = []
    if f.autoextend is None or not (f.autoextend[0] < 100 and f.autoextend[1] > 0):
        problems.append(f"the pool does not autoextend (threshold, percent = {f.autoextend})")
    if not f.monitored:
        problems.append("dmeventd does not monitor the pool")
    return _result("autoextend", problems, f"pool grows by {f.autoextend and f.autoextend[1]}% "
                   f"at {f.autoextend and f.autoextend[0]}% use",
                   "lvchange --metadataprofile imgbase-thin --monitor y VG/pool")


@check
def check_var(f: CheckFacts) -> Result:
    var = f.mounts.get("/var")
    if var is None:
        return Result("var", False, "/var is not a separate mount", "mount the var volume")
    lv = f.lv_devices.get(var.source)
    volumes = {v.name for v in f.layout.volumes} if f.layout else set()
    if lv not in volumes:
        return Result("var", False, f"/var is on {var.source}, not an imgbase volume",
                      f"/var belongs on a thin LV tagged {lvm.TAG_VOLUME}")
    return Result("var", True, f"/var on volume {lv}")


@check
def check_discard(f: CheckFacts) -> Result:
    wanted = ["/"]
    if f.layout:
        wanted += [mp for lv in f.layout.volumes if (mp := mountpoint_of(lv))]
    problems = [f"{mp} mounted without discard" for mp in wanted
                if mp in f.mounts and "discard" not in f.mounts[mp].options]
    seen = ", ".join(m for m in wanted if m in f.mounts)
    return _result("discard", problems, f"discard on {seen}",
                   "add discard to the options in /etc/fstab, then mount -o remount")


@check
def check_boot_entries(f: CheckFacts) -> Result:
    layers = {lv.name for lv in f.layout.layers} if f.layout else set()
    problems = [f"layer {name} has no boot entry" for name in sorted(layers - set(f.entries))]
    problems += [f"boot entry {name} has no layer" for name in sorted(set(f.entries) - layers)]
    problems += [f"boot entry {name} has no kernel or initrd in /boot/{name}"
                 for name in sorted(set(f.entries) - f.boot_files)]
    if f.entries_junk:
        problems.append(f"the entries file holds text that is not an entry (ignored): "
                        f"{f.entries_junk.splitlines()[0][:60]!r}")
    return _result("boot-entries", problems, f"{len(f.entries)} entries, one per layer",
                   "imgbase recover removes leftover layers and entries")


@check
def check_esp(f: CheckFacts) -> Result:
    e = f.esp
    if e is None:
        return Result("esp", True, "no ESP: booted by BIOS, and fstab mounts no /boot/efi")
    if not e.mounted:
        return Result("esp", False, f"{efi.MOUNTPOINT} is not mounted ({e.why})",
                      f"mount {efi.MOUNTPOINT}; imgbase recover then mends its boot files")
    if not e.ours:
        return Result("esp", True, f"{efi.MOUNTPOINT} holds another system's boot chain "
                      "(not imgbase's: left as it is)")
    problems = [f"{rel} does not find this /boot" for rel in e.bad_stubs]
    if e.damaged:
        problems.append(f"{', '.join(e.damaged)}: missing or not as imgbase wrote it")
    elif e.chain_of == e.booted_base and e.differs:
        problems.append(f"{', '.join(e.differs)}: not the booted image's")
    if e.chain_of is None or e.chain_of == e.booted_base:
        good = "shim, signed grub and the removable path are the booted image's, whole"
    else:  # a newer image's chain after a fallback or rollback: never downgraded
        good = (f"the boot chain of {e.chain_of}, whole (the booted image is {e.booted_base};"
                " a chain is never replaced by an older one)")
    return _result("esp", problems, good,
                   "imgbase recover rewrites them from the booted image")


@check
def check_booted(f: CheckFacts) -> Result:
    if f.booted is None:
        return Result("booted", False, "/ is not an imgbase layer",
                      "boot a layer: imgbase status lists them")
    return Result("booted", True, f"/ is layer {f.booted}")


@check
def check_incomplete(f: CheckFacts) -> Result:
    left = sorted(lv.name for lv in f.layout.tagged(TAG_INCOMPLETE)) if f.layout else []
    return _result("incomplete", [f"{name} was left by an interrupted operation"
                                  for name in left], "nothing left half-made",
                   "imgbase recover removes it")


def run_checks(f: CheckFacts) -> list[Result]:
    return [c(f) for c in CHECKS]


# -- gathering ------------------------------------------------------------------------

def limits(settings: CheckSettings, **overrides: float | None) -> CheckSettings:
    """The [check] limits of the settings file, then the command line's."""
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _mounts() -> dict[str, Mount]:
    fss = json.loads(run(["findmnt", "-J", "-l", "-o", "TARGET,SOURCE,OPTIONS"]).stdout)
    out = {}
    for fs in fss["filesystems"]:  # in mount order: the top mount of a target wins
        source = fs["source"].split("[", 1)[0]  # a bind mount reads "DEV[/path]"
        if source.startswith("/dev/"):
            source = os.path.realpath(source)
        out[fs["target"]] = Mount(source, tuple(fs["options"].split(",")))
    return out


def _autoextend(layout: NodeLayout) -> tuple[tuple[int, int] | None, bool]:
    pool = layout.pool
    if pool is None:
        return None, False
    profile = ["--metadataprofile", pool.profile] if pool.profile else []
    out = run(["lvmconfig", *profile, "--type", "full",
               "activation/thin_pool_autoextend_threshold",
               "activation/thin_pool_autoextend_percent"]).stdout
    conf = dict(line.strip().split("=", 1) for line in out.splitlines() if "=" in line)
    setting = (int(conf.get("thin_pool_autoextend_threshold", 100)),
               int(conf.get("thin_pool_autoextend_percent", 0)))
    return setting, pool.monitored


def gather(limits: CheckSettings, boot: Path = Path("/boot")) -> CheckFacts:
    from .facts import NodeFacts

    require_lvm()
    found = lvm.vg_free_with_tag(lvm.TAG_VG)
    tagged = tuple(found)
    if len(tagged) != 1:
        return CheckFacts(tagged_vgs=tagged, layout=None, limits=limits, mounts=_mounts())
    node = NodeFacts.gather(boot, NodeLayout(tagged[0], tuple(lvm.lvs(tagged[0])),
                                             found[tagged[0]]))
    layout = node.layout
    autoextend, monitored = _autoextend(layout)
    files = frozenset(name for name in node.entries
                      if (boot / name / "vmlinuz").is_file()
                      and (boot / name / "initrd.img").is_file())
    devices = {os.path.realpath(lv.path): lv.name for lv in layout.lvs if lv.active}
    try:
        junk = "" if uses_bls(boot) else unrecognised(
            (boot / "grub" / ENTRIES).read_text(errors="replace"))
    except OSError:
        junk = ""
    return CheckFacts(tagged_vgs=tagged, layout=layout, entries=node.entries, boot_files=files,
                      entries_junk=junk,
                      booted=node.booted, mounts=_mounts(), lv_devices=devices,
                      autoextend=autoextend, monitored=monitored, limits=limits,
                      esp=esp_facts(node, boot))


def esp_facts(node: Any, boot: Path, root: Path = Path("/")) -> EspFacts | None:
    """node: NodeFacts. The ESP as check sees it, or None (a BIOS-only node)."""
    fstab = root / "etc/fstab"
    in_fstab = fstab.is_file() and any(
        len(w := line.split()) > 1 and not w[0].startswith("#") and w[1] == efi.MOUNTPOINT
        for line in fstab.read_text(errors="replace").splitlines())
    uefi = Path("/sys/firmware/efi").is_dir()
    if not (in_fstab or uefi):
        return None
    why = "fstab mounts it" if in_fstab else "the node was booted by UEFI"
    esp = boot / "efi"
    if not (os.path.ismount(esp) and os.path.ismount(boot)):
        return EspFacts(why, mounted=False)
    if node.esp_boot_uuid is None:  # mounted, and not imgbase's
        return EspFacts(why, True, ours=False)
    try:
        want = efi.stub_cfg(node.esp_boot_uuid)
    except ImgbaseError:  # a /boot UUID no stub can hold: every stub is wrong
        want = None
    bad = tuple(rel for rel in efi.STUBS if want is None or efi.read_text(esp / rel) != want)
    chain_of, _ = efi.read_record(esp)
    return EspFacts(why, True, True, tuple(efi.damaged(esp)), bad, chain_of,
                    node.booted_base, tuple(efi.stale(esp, root)))


def report(results: list[Result]) -> dict[str, Any]:
    return {"schema_version": 1, "ok": all(r.ok for r in results),
            "checks": [asdict(r) for r in results]}


def render(results: list[Result]) -> str:
    lines = []
    for r in results:
        line = f"{'ok  ' if r.ok else 'FAIL'} {r.name:<16} {r.detail}"
        if r.hint and not r.ok:
            line += f" (hint: {r.hint})"
        lines.append(line)
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results) - failed} ok, {failed} failed")
    return "\n".join(lines)
