"""Contract test of the Boot Loader Spec backend (no Fedora GRUB boots here): the files it
writes carry the keys blscfg reads, are named for the layer (the BLS id grubenv's
saved_entry names), and files imgbase did not write are never read, changed or removed."""

from __future__ import annotations

from pathlib import Path

from imgbase import bootloader
from imgbase.bootloader import bls
from imgbase.plan import write_atomic


def bls_boot(tmp_path: Path) -> Path:
    (tmp_path / "loader/entries").mkdir(parents=True)
    (tmp_path / "loader/entries/fedora-6.5.conf").write_text(
        "title Fedora\nversion 6.5\nlinux /vmlinuz-6.5\noptions root=/dev/sda2 ro\n")
    (tmp_path / "loader/entries/forged.conf").write_text("# imgbase-layer other+1\ntitle x\n")
    return tmp_path


def apply(steps: list) -> None:  # type: ignore[type-arg]
    for step in steps:
        if step.write:
            write_atomic(Path(step.write[0]), step.write[1])
        else:
            assert step.argv[:2] == ("rm", "-f")
            Path(step.argv[2]).unlink(missing_ok=True)


def test_bls_is_chosen_when_boot_has_loader_entries(tmp_path: Path) -> None:
    assert not bootloader.uses_bls(tmp_path)
    assert bootloader.uses_bls(bls_boot(tmp_path))


def test_entries_are_files_keyed_by_layer_and_foreign_ones_are_left_alone(
        tmp_path: Path) -> None:
    boot = bls_boot(tmp_path)
    assert bootloader.read_entries(boot) == {}  # neither Fedora's nor a misnamed marker
    text = bootloader.entry(boot, "n-1-1+1", "/dev/vg/n-1-1+1", "rw quiet")
    apply(bootloader.write_entry_steps(boot, {}, {"n-1-1+1": text}))
    conf = (boot / "loader/entries/n-1-1+1.conf").read_text()
    keys = {line.split()[0] for line in conf.splitlines() if not line.startswith("#")}
    assert {"title", "version", "linux", "initrd", "options"} <= keys
    assert "options root=/dev/vg/n-1-1+1 rw quiet" in conf
    assert bootloader.kernel_args(conf) == "rw quiet"
    assert list(bootloader.read_entries(boot)) == ["n-1-1+1"]
    apply(bootloader.remove_entry_steps(boot, "n-1-1+1", {"n-1-1+1": conf})[:1])
    assert sorted(p.name for p in (boot / "loader/entries").iterdir()) == [
        "fedora-6.5.conf", "forged.conf"]


def test_bls_render_round_trips() -> None:
    text = bls.render("a-1-1+2", "/dev/v/a-1-1+2", "rw")
    assert bls.layer_of(text) == "a-1-1+2" and bootloader.kernel_args(text) == "rw"
