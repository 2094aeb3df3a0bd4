"""No kernel argument can break out of its boot entry, whatever boundary it came through.

The entry writers refuse every word GRUB's script syntax gives a meaning to, so each
entry is three literal lines. Where grub-common is installed (the Makefile's
APT_PACKAGES), GRUB's own parser (grub-script-check) reads the rendered grub.cfg and
entries: what imgbase writes parses, and a hostile entry of the kind the writers refuse
would not (so the check can tell).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from imgbase.bootloader import bls, grub
from imgbase.errors import InputError
from imgbase.image import kargs
from imgbase.node import update
from tests.unit.test_node_plans import NVR
from tests.unit.test_update_plan import FACTS

A, B = f"{NVR}+1", f"{NVR}+2"
HOSTILE = ["x}", "}", "$(reboot)", "${prefix}", "`id`", "a;b", "a'b", 'a"b', "a|b", "a&b",
           "a<b", "a>b", "(x)", "#x", "a*", "a?", "[a]", "a\\b", "ä"]
SPACES = ["a b", "a\nb", "a\tb", "a\r\nb", ""]  # one argument, or none
REAL = ["rw", "console=ttyS0,115200n8", "crashkernel=1G-4G:192M,4G-64G:256M",
        "acpi_osi=!Windows", "imgbase.agent.endpoints=https://e1:2379,https://e2:2379",
        "video=1024x768@60", "isolcpus=1-3", "rd.lvm.lv=vg/lv", "mitigations=off",
        "module.param=0x1f", "systemd.unit=multi-user.target", "dyndbg=+p", "x=%^~"]
CHECK = shutil.which("grub-script-check")


def script_check(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "menu.cfg"
    path.write_text(text)
    assert CHECK is not None
    return subprocess.run([CHECK, str(path)], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("arg", HOSTILE)
def test_the_entry_writers_refuse_a_word_grub_would_read(arg: str) -> None:
    for render in (grub.entry, bls.render):
        with pytest.raises(InputError, match="cannot go into a boot entry"):
            render(B, f"/dev/vg/{B}", f"rw {arg} quiet")
    with pytest.raises(InputError, match="cannot go into a boot entry"):
        kargs.check_arg(arg)


@pytest.mark.parametrize("arg", SPACES)
def test_whitespace_is_no_part_of_an_argument_and_never_a_line_break(arg: str) -> None:
    with pytest.raises(InputError, match="cannot go into a boot entry"):
        kargs.check_arg(arg)
    text = grub.entry(B, f"/dev/vg/{B}", f"rw {arg}")
    assert len(text.splitlines()) == 4  # the kernel line stays one line
    assert grub.kernel_args(text).split() == ["rw", *arg.split()]


def test_a_hostile_layer_or_root_is_refused_too() -> None:
    with pytest.raises(InputError, match="layer name"):
        grub.entry("a+1' --id 'b", "/dev/vg/a+1", "rw")
    with pytest.raises(InputError, match="root device"):
        grub.entry("a+1", "/dev/vg/a+1 }", "rw")


def test_an_images_kernel_args_are_checked_by_update() -> None:
    """An image's image.json kernel_args: refused where update reads them, and again where
    the entry is written (a plan made from unchecked facts still cannot carry them)."""
    with pytest.raises(InputError, match="x.squashfs: kernel_args: 'quiet' is not a list"):
        kargs.check_args("quiet", "x.squashfs: kernel_args")
    with pytest.raises(InputError, match="kernel argument '}' cannot go into a boot entry"):
        kargs.check_args(["quiet", "}"])
    with pytest.raises(InputError, match="kernel argument 'x}' cannot go into a boot entry"):
        update.plan_update(replace(FACTS, image_kargs=("x}",)))


def test_the_rendered_entries_are_the_literal_lines(tmp_path: Path) -> None:
    text = grub.render_entries({B: grub.entry(B, f"/dev/vg/{B}", " ".join(REAL)),
                                A: grub.entry(A, f"/dev/vg/{A}", "rw")})
    assert text == (
        f"menuentry 'imgbase {B}' --id '{B}' {{\n"
        f"  linux /{B}/vmlinuz root=/dev/vg/{B} {' '.join(REAL)}\n"
        f"  initrd /{B}/initrd.img\n}}\n"
        f"menuentry 'imgbase {A}' --id '{A}' {{\n"
        f"  linux /{A}/vmlinuz root=/dev/vg/{A} rw\n"
        f"  initrd /{A}/initrd.img\n}}\n")
    assert grub.kernel_args(grub.parse_entries(text)[B]).split() == REAL
    assert all(grub.entry_problem(name, block) is None
               for name, block in grub.parse_entries(text).items())


@pytest.mark.skipif(CHECK is None, reason="grub-script-check (grub-common) not installed")
def test_grub_parses_what_imgbase_writes_and_not_what_it_refuses(tmp_path: Path) -> None:
    entries = grub.render_entries({B: grub.entry(B, f"/dev/vg/{B}", " ".join(REAL)),
                                   A: grub.entry(A, f"/dev/vg/{A}", "rw")})
    rescue = grub.rescue_entry("n-1.0-1", "/dev/vg/n-1.0-1", "0b00",
                               grub.rescue_consoles(" ".join(REAL)))
    good = script_check(grub.grub_cfg(A) + entries + rescue, tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    # what an unchecked image's argument did to the shared file: the new entry comes
    # first and its open quote swallows the fallback's entry after it
    legacy = entries.replace(" ".join(REAL), "rw a'b", 1)
    bad = script_check(grub.grub_cfg(A) + legacy, tmp_path)
    assert bad.returncode != 0


@pytest.mark.parametrize("arg", HOSTILE)
def test_the_menu_reader_flags_an_entry_written_before_the_check(arg: str) -> None:
    """Nodes may hold entries an older imgbase wrote with an image's unchecked argument:
    recover and gc then refuse (the menu may not be what GRUB reads)."""
    text = grub.entry(B, f"/dev/vg/{B}", "rw").replace(" rw\n", f" rw {arg}\n")
    assert grub.entry_problem(B, text) is not None


def test_a_broken_entry_is_never_written_again_and_deleting_its_argument_repairs_it() -> None:
    """One file holds every entry: imgbase refuses to rewrite it with a broken entry in it
    (a layer --add would otherwise carry it on), and kargs --delete of the bad argument,
    which rewrites that entry alone from its words, gives a file GRUB reads whole."""
    boot = Path("/boot")
    broken = grub.entry(A, f"/dev/vg/{A}", "rw").replace(" rw\n", " rw x'y\n")
    current = {A: broken}
    with pytest.raises(InputError, match="would break the menu") as exc:
        grub.write_steps(boot, current, {B: grub.entry(B, f"/dev/vg/{B}", "rw")})
    assert exc.value.hint == (f"imgbase kargs --layer {A} --delete ARG (or layer --remove {A}) "
                              "first")
    args = kargs.edit(grub.kernel_args(broken).split(), delete=["x'y"])
    step, _ = grub.write_steps(boot, current, {A: grub.entry(A, f"/dev/vg/{A}", " ".join(args))})
    assert step.write is not None and grub.parse_entries(step.write[1])[A] == grub.entry(
        A, f"/dev/vg/{A}", "rw")
    with pytest.raises(InputError, match="cannot go into a boot entry"):
        kargs.edit(["rw"], append=["x'y"])


def test_two_broken_entries_are_repaired_one_at_a_time() -> None:
    """layer --add and update copy the booted layer's arguments, so a bad one is often in
    two entries: each repair (kargs --delete, layer --remove) leaves the other bad entry
    and must still be written; anything that does not lessen the harm is refused."""
    boot = Path("/boot")
    broken = {n: grub.entry(n, f"/dev/vg/{n}", "rw").replace(" rw\n", " rw x}\n")
              for n in (A, B)}
    fixed = grub.entry(A, f"/dev/vg/{A}", "rw")
    step, _ = grub.write_steps(boot, broken, {A: fixed})  # kargs --layer A --delete 'x}'
    assert step.write is not None
    step, _ = grub.write_steps(boot, broken, {A: None})  # layer --remove A
    assert step.write is not None and A not in grub.parse_entries(step.write[1])
    with pytest.raises(InputError, match="would break the menu"):
        grub.write_steps(boot, broken, {"c+1": grub.entry("c+1", "/dev/vg/c+1", "rw")})
    with pytest.raises(InputError, match="would break the menu"):
        grub.write_steps(boot, {A: fixed, B: broken[B]}, {A: broken[A]})


def test_the_fallback_position_follows_the_entries(tmp_path: Path) -> None:
    """GRUB 2.06 takes `fallback` as a menu position only: the file written with the
    entries turns grubenv's imgbase_fallback (a layer) into its position, and grub.cfg
    sources it after the entries."""
    names = ["n-1-1+1", "n-1-1+2", "n-1-2+1"]
    steps = grub.write_steps(tmp_path, {}, {n: grub.entry(n, f"/dev/vg/{n}", "rw")
                                            for n in names})
    (_, entries), (path, fallback) = (s.write for s in steps)  # type: ignore[misc]
    assert path.endswith("/grub/imgbase-fallback.cfg")
    order = list(grub.parse_entries(entries))
    for name in names:
        assert f"= '{name}' ]; then set fallback={order.index(name)}; fi" in fallback
    cfg = grub.grub_cfg(names[0])
    assert cfg.index("source /grub/imgbase-entries.cfg") < cfg.index(
        "source /grub/imgbase-fallback.cfg")


def test_the_rescue_menu_counts_only_where_grub_cfg_sources_it(tmp_path: Path) -> None:
    from imgbase.bootloader.grub import RESCUE, grub_cfg, read_rescue_menu, rescue_steps

    (tmp_path / "grub").mkdir()
    [step] = rescue_steps(tmp_path, "vg", ["n-1-1", "n-2-1"], "0b00", ("console=ttyS0",))
    assert step.write is not None
    (tmp_path / "grub" / RESCUE).write_text(step.write[1])
    (tmp_path / "grub/grub.cfg").write_text(grub_cfg("n-2-1+1", "0b00"))
    assert read_rescue_menu(tmp_path) == (True, frozenset({"n-1-1", "n-2-1"}))
    older = grub_cfg("n-2-1+1").replace(f"source /grub/{RESCUE}", "")  # before rescue
    (tmp_path / "grub/grub.cfg").write_text(older)
    assert read_rescue_menu(tmp_path) == (False, frozenset())
