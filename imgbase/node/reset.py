"""`imgbase reset`: a fresh layer of the booted base, for a node whose root was broken.

The new layer is a new thin snapshot of the base the node runs, so everything written to
the root since the image was installed is left behind (a package half-removed, a file of
/usr deleted, an /etc edit that stops the boot), and ``/var`` is untouched (a volume of
its own). Its /etc is the image's factory /etc, except what makes the node *this* node,
which is carried from the running layer (:data:`IDENTITY`): machine-id, hostname and
hosts, SSH host keys and root's authorized keys, the network (systemd-networkd files),
libvirt's configuration (the VMs defined on the node, their networks, storage pools and
secrets: a hypervisor must not forget its VMs), and /etc/imgbase (the cluster join, its TLS
files, the trusted image keys, imgbase.toml). Local users and passwords go back to the
image's. ``--keep-etc`` carries the whole /etc instead (when what broke
is outside it); ``--factory`` carries nothing (the node forgets who it is: it joins no
cluster, trusts no key, and gets new SSH host keys at boot).

The fstab is written from the volume tags, as for every layer, with the /boot and /boot/efi
lines of the running one and nothing else of it. The new layer becomes the
default on trial, with the booted layer as the fallback: a reset that does not come up
healthy goes back by itself. The old layer stays until gc or ``layer --remove``.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from .. import bootloader
from ..bootloader import grubenv
from ..errors import die
from ..plan import Plan, Step
from ..storage.layout import (
    WORK,
    layer_create_steps,
    layer_finish_steps,
    mountpoint_of,
    rewrite_fstab,
)
from .boot import DEFAULT_TRIES, trial_env
from .facts import NodeFacts
from .kargs import model_args

#: what makes a node this node, relative to / (a glob in the last part)
IDENTITY = (
    "etc/machine-id", "etc/hostname", "etc/hosts", "etc/ssh/ssh_host_*",
    "etc/systemd/network", "etc/libvirt", "etc/imgbase", "root/.ssh",
)


BOOT_MOUNTS = ("/boot", "/boot/efi")


def boot_lines(fstab: str) -> str:
    """The /boot and /boot/efi lines of an fstab: all a new layer keeps of the running one
    (a line an admin added, perhaps the one that stops the boot, stays behind).

    >>> boot_lines("/dev/vg/a+1 / ext4 defaults 0 1\\nLABEL=boot /boot ext4 defaults 0 2\\n"
    ...            "/dev/vg/gone /srv ext4 defaults 0 2\\n")
    'LABEL=boot /boot ext4 defaults 0 2\\n'
    """
    return "".join(f"{line}\n" for line in fstab.splitlines()
                   if len(w := line.split()) > 1 and not w[0].startswith("#")
                   and w[1] in BOOT_MOUNTS)


@dataclass(frozen=True)
class ResetFacts:
    node: NodeFacts
    fstab: str  # the running /etc/fstab: only its /boot and /boot/efi lines are kept
    carry: tuple[str, ...]  # paths relative to / that exist and go to the new layer


def carried(root: Path, keep_etc: bool, factory: bool) -> tuple[str, ...]:
    """The paths under root the new layer takes from the running one (existing ones only,
    never through a symlink out of root)."""
    if factory:
        return ()
    wanted = ("etc", "root/.ssh") if keep_etc else IDENTITY
    found = []
    for rel in wanted:
        parent, _, name = rel.rpartition("/")
        directory = root / parent
        if directory.is_symlink() or not directory.is_dir():
            continue
        for entry in sorted(os.listdir(directory)):
            if fnmatch.fnmatchcase(entry, name):
                found.append(f"{parent}/{entry}" if parent else entry)
    return tuple(found)


def plan_reset(f: ResetFacts, tries: int = DEFAULT_TRIES) -> Plan:
    node, layout = f.node, f.node.layout
    node.need_boot()
    if not 1 <= tries <= 9:
        die(f"--tries {tries} is out of range", hint="give 1 to 9")
    base = node.booted_base
    if base is None or node.booted is None:
        die("the running root is not a layer, so there is no base to reset to",
            hint="boot a layer (imgbase status lists them), then imgbase reset")
    if node.default != node.booted:
        die(f"the default layer is {node.default}, not the booted {node.booted}: a reset "
            "would drop that choice", hint=f"boot {node.default} first, or make "
            f"{node.booted} the default again: imgbase boot --set-default {node.booted}")
    layer = layout.next_layer(base)
    vg, mnt = layout.vg, WORK / "reset"
    volumes = [(mp, lv.path) for lv in layout.volumes if (mp := mountpoint_of(lv))]
    create = layer_create_steps(vg, base, layer, mnt,
                                rewrite_fstab(boot_lines(f.fstab), f"/dev/{vg}/{layer}",
                                              volumes))
    fstab_at = [s.name for s in create].index("layer-fstab")
    steps = create[:fstab_at]
    if f.carry:
        # rsync --relative: /./etc/hostname lands at mnt/etc/hostname, modes, owners,
        # xattrs and ACLs kept; directories are mirrored (--delete inside them)
        steps.append(Step("carry", ("rsync", "-aHAX", "--relative", "--delete",
                                    *(f"/./{rel}" for rel in f.carry), f"{mnt}/"),
                          note="the node's identity from the running layer"))
    steps += create[fstab_at:]  # the fstab last: carried /etc never overwrites it
    kargs = model_args(node, node.booted)
    steps += [
        bootloader.kernel_files_step(mnt, node.boot, layer),
        *bootloader.write_entry_steps(node.boot, node.entries, {
            layer: bootloader.entry(node.boot, layer, f"/dev/{vg}/{layer}", kargs)}),
        *layer_finish_steps(vg, layer, mnt),
    ]
    env = trial_env(node.env, layer, tries, node.booted)
    steps.append(Step("boot-default", write=(str(node.boot / "grub/grubenv"),
                                             grubenv.render(env)),
                      note="on trial: a reset that does not boot healthy goes back"))
    return Plan("reset", tuple(bootloader.committed(node.boot, steps)),
                meta=(("layer", layer), ("from", node.booted)))
