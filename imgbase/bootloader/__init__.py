"""Boot entries for layers: the GRUB menu imgbase owns (Debian's grub has no blscfg),
Boot Loader Spec entries for Fedora-style GRUB, and the grubenv that holds the default,
the one-time next entry and the boot counter."""

from .grub import (
    ENTRIES,
    add_entry_steps,
    entry,
    grub_cfg,
    kernel_args,
    parse_entries,
    read_entries,
    read_grubenv,
    remove_entry_steps,
    render_entries,
    set_default_step,
)

__all__ = ["ENTRIES", "add_entry_steps", "entry", "grub_cfg", "kernel_args", "parse_entries",
           "read_entries", "read_grubenv", "remove_entry_steps", "render_entries",
           "set_default_step"]
