"""Boot entries for layers, whatever the bootloader reads them from.

Two menus: the GRUB menu imgbase owns on Debian (``grub/imgbase-entries.cfg``; Debian's
grub has no blscfg) and Boot Loader Spec files for Fedora-style GRUB with blscfg
(``loader/entries/<layer>.conf``), chosen by what /boot holds. Either way an entry is
keyed by the layer name, its kernel and initrd live in ``/boot/<layer>/``, and
grubenv's ``saved_entry`` names the default layer.
"""

from __future__ import annotations

from pathlib import Path

from ..plan import Step
from . import bls, grub, grubenv
from .grub import ENTRIES, grub_cfg, read_grubenv, render_entries

__all__ = ["ENTRIES", "add_entry_steps", "commit_argv", "committed", "entry", "grub_cfg",
           "kernel_args", "kernel_files_step", "read_entries", "read_grubenv", "read_menu",
           "read_rescue_menu",
           "remove_entry_steps", "render_entries", "rescue_steps", "set_default_step",
           "uses_bls", "write_entry_steps"]

# GRUB reads /boot's ext4 without replaying its journal: a file written and fsync'd, but
# only in the journal so far, is not there for GRUB (the old grubenv would still be
# read). A freeze checkpoints the journal into place -- OSTree does the same. A /boot that
# is not a mount point of its own gets a sync.
COMMIT = ('if mountpoint -q "$1"; then fsfreeze --freeze "$1"; rc=$?; '
          'fsfreeze --unfreeze "$1" 2>/dev/null; exit $rc; else sync -f "$1"; fi')


def commit_argv(boot: Path) -> tuple[str, ...]:
    return ("sh", "-c", COMMIT, "boot-commit", str(boot))


def committed(boot: Path, steps: list[Step]) -> list[Step]:
    """steps, plus a commit of /boot when any of them writes there (what GRUB will see).

    >>> [s.name for s in committed(Path("/boot"), [Step("x", write=("/boot/grub/e", ""))])]
    ['x', 'boot-commit']
    >>> [s.name for s in committed(Path("/boot"), [Step("y", ("lvremove", "vg/l"))])]
    ['y']
    """
    prefix = str(boot).rstrip("/") + "/"
    touches = any((s.write and s.write[0].startswith(prefix))
                  or any(a.startswith(prefix) for a in s.argv) for s in steps)
    return [*steps, Step("boot-commit", commit_argv(boot))] if touches else steps


def uses_bls(boot: Path) -> bool:
    """A Fedora-style /boot (loader/entries exists) takes BLS files."""
    return (boot / bls.ENTRIES_DIR).is_dir()


def read_entries(boot: Path) -> dict[str, str]:
    """imgbase's entries, by layer name."""
    return bls.read(boot) if uses_bls(boot) else grub.read_entries(boot)


def read_menu(boot: Path) -> tuple[dict[str, str], str | None]:
    """The entries, and why the menu is not to be trusted (None: it is): no entries file,
    text that is not an entry, an entry GRUB may not read as written, no grubenv or no
    default in it. Planners that remove what the menu does not name refuse on a problem."""
    if uses_bls(boot):
        entries, problem = bls.read(boot), None
    else:
        entries, problem = grub.read_menu(boot)
    env_path = boot / grub.GRUB_DIR / grub.GRUBENV
    if problem is None and not env_path.is_file():
        problem = f"there is no {env_path}"
    elif problem is None and not grubenv.read(env_path).get("saved_entry"):
        problem = f"{env_path} names no default layer (saved_entry)"
    return entries, problem


def entry(boot: Path, layer: str, root: str, kargs: str) -> str:
    return bls.render(layer, root, kargs) if uses_bls(boot) else grub.entry(layer, root, kargs)


def kernel_args(text: str) -> str:
    """The kernel arguments after root= of an entry of either kind."""
    return grub.kernel_args(text)


def write_entry_steps(boot: Path, current: dict[str, str], changes: dict[str, str | None]
                      ) -> list[Step]:
    """Steps that set (text) or remove (None) the changed layers' entries."""
    if uses_bls(boot):
        return bls.write_steps(boot, changes)
    return grub.write_steps(boot, current, changes)


def kernel_files_step(mnt: Path, boot: Path, layer: str, name: str = "boot-files") -> Step:
    """Copy the newest kernel (and its initrd) of the tree at mnt to /boot/<layer>/ (a
    base's rescue kernel: /boot/<base>/)."""
    script = ('k=$(ls -v "$1"/boot/vmlinuz-* 2>/dev/null | tail -n 1); v=${k##*/vmlinuz-}; '
              '[ -n "$k" ] && [ -f "$1/boot/initrd.img-$v" ] || '
              '{ echo "the layer has no kernel and initrd in its /boot" >&2; exit 1; }; '
              'install -D -m 0644 "$k" "$2/vmlinuz" && '
              'install -D -m 0644 "$1/boot/initrd.img-$v" "$2/initrd.img"')
    return Step(name, ("sh", "-c", script, name, str(mnt), str(boot / layer)))


def add_entry_steps(boot: Path, layer: str, root: str, kargs: str, kernel: Path, initrd: Path,
                    current: dict[str, str]) -> list[Step]:
    """Copy the layer's kernel and initrd to /boot/<layer>/, then give it its entry."""
    return [
        Step("boot-kernel", ("install", "-D", "-m", "0644", str(kernel),
                             str(boot / layer / "vmlinuz"))),
        Step("boot-initrd", ("install", "-D", "-m", "0644", str(initrd),
                             str(boot / layer / "initrd.img"))),
        *write_entry_steps(boot, current, {layer: entry(boot, layer, root, kargs)}),
    ]


def remove_entry_steps(boot: Path, layer: str, current: dict[str, str]) -> list[Step]:
    """Drop the layer's entry first, then its files."""
    return [
        *write_entry_steps(boot, current, {layer: None}),
        Step("boot-files", ("rm", "-rf", "--one-file-system", str(boot / layer))),
    ]


def read_rescue_menu(boot: Path) -> tuple[bool, frozenset[str]]:
    """Whether GRUB reads the rescue menu (grub.cfg sources it; never on a BLS /boot), and
    the bases it has an entry for."""
    if uses_bls(boot):
        return False, frozenset()
    return grub.read_rescue_menu(boot)


def rescue_steps(boot: Path, vg: str, bases: list[str], boot_uuid: str | None, kargs: str
                 ) -> list[Step]:
    """The rescue menu: an entry for each base (their kernels in /boot/<base>/), with the
    consoles of kargs (a layer's arguments). A BLS /boot gets none (Fedora's GRUB has its
    own rescue entry)."""
    if uses_bls(boot):
        return []
    return grub.rescue_steps(boot, vg, bases, boot_uuid, grub.rescue_consoles(kargs))


def set_default_step(boot: Path, layer: str, env: dict[str, str] | None = None) -> Step:
    """grubenv with saved_entry=layer (other variables of env kept), written atomically."""
    new = {**(env or {}), "saved_entry": layer}
    return Step("boot-default", write=(str(boot / "grub" / grub.GRUBENV), grubenv.render(new)))
