"""`imgbase base|layer --list/--add/--remove`: the admin's hands on bases and layers.

Each planner is pure (node facts in, a Plan out) and refuses, before anything
is written, to touch the booted layer or the base under it, or the default
layer (the node would boot something unexpected next time).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .. import bootloader
from ..errors import die
from ..image.naming import Layer, Nvr
from ..image.trust import (
    accepted_step,
    check_insecure,
    read_accepted,
    refuse_rollback,
    verified_copy,
    with_key,
)
from ..plan import Plan, Step
from ..storage.layout import (
    WORK,
    base_from_image_steps,
    layer_create_steps,
    layer_finish_steps,
    mountpoint_of,
    rewrite_fstab,
)
from .facts import NodeFacts
from .kargs import model_args


def rescue_menu_steps(f: NodeFacts, add: tuple[str, ...] = (), drop: tuple[str, ...] = ()
                      ) -> list[Step]:
    """The rescue menu once the bases in add have their kernel in /boot/<base>/ (copied
    by the caller's earlier step) and those in drop are gone; then drop's directories in
    /boot, whole or left half-copied. Nothing where GRUB does not read the menu."""
    gone = [Step(f"rescue-remove-{b}", ("rm", "-rf", "--one-file-system", str(f.boot / b)))
            for b in drop if b in f.base_dirs]
    if not f.rescue_menu:
        return gone
    bases = [b for b in (*f.rescue, *add) if b not in drop]
    if set(bases) == set(f.rescue):
        return gone
    model = f.default if f.default in f.entries else next(iter(f.entries), None)
    kargs = bootloader.kernel_args(f.entries[model]) if model else ""
    return [*bootloader.rescue_steps(f.boot, f.layout.vg, bases, f.boot_uuid, kargs), *gone]


def needs_rescue(f: NodeFacts, base: str) -> bool:
    """base is to get its rescue kernel and entry now: GRUB reads the rescue menu, and the
    base has no entry there yet."""
    return f.rescue_menu and base not in f.rescue


def rescue_add_steps(f: NodeFacts, tree: Path, base: str) -> list[Step]:
    """base's rescue kernel (from the tree of a layer of it, just made) and its entry."""
    if not needs_rescue(f, base):
        return []
    return [bootloader.kernel_files_step(tree, f.boot, base, "rescue-files"),
            *rescue_menu_steps(f, (base,))]


#: what another layer's kernel and initrd are taken to need when /boot has none to go by
BOOT_NEED_FLOOR = 64 << 20


def _existing(path: Path) -> Path:
    """path, or its nearest parent that exists (what a file written there would fill)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def boot_need(boot: Path, model: str | None) -> int:
    """Bytes another layer's kernel and initrd take on /boot, plus 10 %: as large as the
    model layer's; else the largest layer's there; else BOOT_NEED_FLOOR."""
    def size(d: Path) -> int:
        return sum(st.st_size for st in (p.lstat() for p in d.iterdir())
                   if stat.S_ISREG(st.st_mode))

    if model and (boot / model).is_dir():
        return size(boot / model) * 11 // 10
    kernels = boot.glob("*/vmlinuz") if boot.is_dir() else []
    return max((size(k.parent) * 11 // 10 for k in kernels), default=BOOT_NEED_FLOOR)


def check_boot_space(boot: Path, model: str | None, copies: int = 1) -> None:
    """Refuse, before any entry changes, when /boot cannot take copies of another kernel
    and initrd (`boot_need`; 2: a new base's rescue copy too). Never skipped: a directory
    that is missing is measured at its nearest existing parent, where the files would go."""
    need = boot_need(boot, model) * copies
    try:
        st = os.statvfs(_existing(boot))
    except OSError as exc:
        die(f"{boot}: cannot measure its free space: {exc.strerror}",
            hint="is /boot mounted? (findmnt /boot)")
    free = st.f_bavail * st.f_frsize
    if free < need:
        die(f"/boot is too full for another layer: {free >> 20} MiB free, {need >> 20} MiB "
            "needed", hint="remove a layer (imgbase layer --remove) or grow /boot")


def plan_layer_add(f: NodeFacts, base: str | None, fstab: str) -> Plan:
    f.need_boot()
    layout = f.layout
    base = base or f.booted_base
    if base is None:
        die("no base given and the running root is not a layer",
            hint="name one: imgbase layer --add BASE (imgbase base --list)")
    if layout.get(base) is None or layout.get(base) not in layout.bases:
        die(f"{base} is not a base of this node", hint="imgbase base --list names them")
    layer = layout.next_layer(base)
    vg, mnt = layout.vg, WORK / "layer-add"
    volumes = [(mp, lv.path) for lv in layout.volumes if (mp := mountpoint_of(lv))]
    new_fstab = rewrite_fstab(fstab, f"/dev/{vg}/{layer}", volumes)
    # carried over from the booted layer if it is of the same base, else from the default
    source = f.booted if base == f.booted_base else f.default
    model = source if source in f.entries else next(iter(f.entries), None)
    kargs = model_args(f, model)
    new_entry = bootloader.entry(f.boot, layer, f"/dev/{vg}/{layer}", kargs)
    steps = [
        *layer_create_steps(vg, base, layer, mnt, new_fstab),
        bootloader.kernel_files_step(mnt, f.boot, layer),
        # a base without its rescue entry yet (one from base --add)
        *rescue_add_steps(f, mnt, base),
        *bootloader.write_entry_steps(f.boot, f.entries, {layer: new_entry}),
        *layer_finish_steps(vg, layer, mnt),
    ]
    return Plan("layer-add", tuple(bootloader.committed(f.boot, steps)))


def _refuse_in_use(f: NodeFacts, layer: str, action: str) -> None:
    if layer == f.booted:
        die(f"{action}: layer {layer} is booted", hint="boot another layer first")
    if layer == f.default:
        die(f"{action}: layer {layer} is the default boot entry",
            hint="make another layer the default first")


def plan_layer_remove(f: NodeFacts, layer: str) -> Plan:
    Layer.parse(layer)
    lv = f.layout.get(layer)
    if lv is None or lv not in f.layout.layers:
        die(f"{layer} is not a layer of this node", hint="imgbase layer --list names them")
    _refuse_in_use(f, layer, f"cannot remove {layer}")
    f.need_boot()
    steps = [*bootloader.remove_entry_steps(f.boot, layer, f.entries),
             Step("layer-remove", ("lvremove", "-y", lv.path))]
    return Plan("layer-remove", tuple(bootloader.committed(f.boot, steps)))


def plan_base_add(f: NodeFacts, image: str, nvr: str, size: str, key: str | None = None,
                  accepted: dict[str, str] | None = None, image_nvr: str | None = None
                  ) -> Plan:
    """image: a verified copy (trust.verified_copy); nvr: the base's name (an LVM name);
    key: what signed it (tagged on the base); accepted: the anti-rollback record, raised to
    the image's own NVR (image_nvr, not a name given with --nvr) when it is done (None:
    left alone)."""
    name = Nvr.parse(nvr)
    Nvr.check_parts(name.name, name.version, name.release)
    if f.layout.get(nvr) is not None:
        die(f"{nvr} already exists on this node", hint="imgbase base --list names the bases")
    pool = f.layout.pool
    if pool is None:
        die(f"volume group {f.layout.vg} has no thin pool tagged imgbase:pool",
            hint="imgbase check tells what is wrong")
    steps = with_key(base_from_image_steps(f.layout.vg, nvr, image, size, WORK / "base-add",
                                           pool.name), f.layout.vg, nvr, key)
    if accepted is not None:
        steps.append(accepted_step(accepted, Nvr.parse(image_nvr or nvr)))
    return Plan("base-add", tuple(steps))


def plan_base_remove(f: NodeFacts, base: str) -> Plan:
    Nvr.parse(base)
    lv = f.layout.get(base)
    if lv is None or lv not in f.layout.bases:
        die(f"{base} is not a base of this node", hint="imgbase base --list names them")
    layers = [la.name for la in f.layout.layers_of(base)]
    for layer in layers:
        _refuse_in_use(f, layer, f"cannot remove base {base}")
    if base == f.rescued:
        die(f"cannot remove base {base}: the rescue system runs from it",
            hint="boot a layer first")
    f.need_boot()
    steps: list[Step] = rescue_menu_steps(f, drop=(base,))
    entries = dict(f.entries)
    for layer in layers:
        steps += bootloader.remove_entry_steps(f.boot, layer, entries)
        entries.pop(layer, None)
        steps.append(Step(f"remove-{layer}", ("lvremove", "-y", f"{f.layout.vg}/{layer}")))
    steps.append(Step("remove-base", ("lvremove", "-y", lv.path)))
    return Plan("base-remove", tuple(bootloader.committed(f.boot, steps)))


@contextlib.contextmanager
def base_to_add(image: str, size: str, nvr: str | None, *, insecure: bool,
                allow_downgrade: bool) -> Iterator[Plan]:
    """``base --add``: the image verified into a private copy (discarded after), refused
    when older than the newest accepted, and the plan that makes its base."""
    from .install import parse_size

    if not Path(image).is_file():
        die(f"{image}: no such image", hint="give the .squashfs made by imgbase compose")
    parse_size(size)
    check_insecure(insecure)
    verified = verified_copy(image, insecure=insecure)
    try:
        facts = NodeFacts.gather()
        accepted = read_accepted()
        refuse_rollback(Nvr.parse(verified.nvr), accepted, allow_downgrade)
        yield plan_base_add(facts, str(verified.path), nvr or verified.nvr, size,
                            verified.key, accepted, verified.nvr)
    finally:
        verified.discard()
