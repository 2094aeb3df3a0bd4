"""Power cuts while `imgbase update` writes the ESP: the firmware always finds a whole shim
and a whole grub, and the node boots by itself (UEFI, the removable-media path).

v2 here carries a shim and a grub that differ from v1's (the signed files with another PE
CheckSum field: Authenticode leaves that field out of the hash, so shim and the firmware load
them as they load the originals, and their sha256 differs), so the update replaces four
files on the ESP (EFI/debian and EFI/BOOT, grub before shim), each written to NAME.new,
synced, and renamed over NAME. The power is cut after each of those steps and in the
middle of the two first copies; after each cut the node boots on its own, every file of the
chain on the ESP is v1's or v2's (never a mix of bytes), `imgbase recover` rewrites the ESP
from the booted image and `imgbase check` passes.

Part of the power-cut campaign (`make test-powercut`, marker `powercut`): ~12 cuts, ~100 s
each under TCG.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgbase.bootloader import efi
from imgbase.image import trust
from imgbase.run import run
from imgbase.vm import Guest
from tests.images import derive, signing_key, stop_agent
from tests.vm.nodes import MEDIA, NVR, V2, module_node, mount_media
from tests.vm.test_power_cut import (
    IMAGE,
    A,
    back_to_v1_only,
    cut,
    recover_and_check,
    update_steps,
)

pytestmark = [pytest.mark.slow, pytest.mark.vm, pytest.mark.powercut]

CHANGED = ("shim", "grub")  # mok stays as it is
# seconds into a copy step: a cut with the copy half done
DURING = [("esp-efi-debian-grubx64.efi", 0.1), ("esp-efi-boot-bootx64.efi", 0.05)]


def other_checksum(data: bytes) -> bytes:
    """The PE with its optional header's CheckSum changed (bytes appended would be refused by
    shim: "Malformed binary after Attribute Certificate Table")."""
    pe = int.from_bytes(data[0x3C:0x40], "little")
    assert data[pe:pe + 4] == b"PE\0\0", "not a PE image"
    at = pe + 4 + 20 + 64  # signature, COFF header, then CheckSum in the optional header
    old = int.from_bytes(data[at:at + 4], "little")
    return data[:at] + (old ^ 0x5A5A5A5A).to_bytes(4, "little") + data[at + 4:]


def other_chain(tree: Path) -> None:
    for name in CHANGED:
        path = tree / efi.SOURCES[name]
        path.write_bytes(other_checksum(path.read_bytes()))


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest, node_image: Path, installed_disks: dict[str, Path],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    work = tmp_path_factory.mktemp("power-esp")
    files = work / "files"
    files.mkdir()
    home = signing_key(work / "gnupg", files / "trusted.gpg")
    trust.sign(str(derive(node_image, files, "1.1", alter=other_chain)), homedir=str(home))
    stop_agent(home)
    media = work / "media.squashfs"
    run(["mksquashfs", str(files), str(media), "-quiet", "-no-progress", "-noI", "-noD",
         "-noF", "-noX"])
    for guest in module_node(request, installed_disks["minimal"], work / "run",
                             attach=(media,), firmware="uefi"):
        mount_media(guest)
        guest.run(f"install -D -m 644 {MEDIA}/trusted.gpg /etc/imgbase/trusted.d/test.gpg")
        yield guest


def chain_digests(guest: Guest) -> dict[str, str]:
    out = guest.run("cd /boot/efi && sha256sum " + " ".join(efi.FILES)).stdout
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}


def test_power_cuts_while_the_esp_is_written_leave_it_bootable(node: Guest) -> None:
    assert node.host().file("/sys/firmware/efi").is_directory  # booted by UEFI
    v1 = chain_digests(node)
    v2_sources = {name: node.run(f"unsquashfs -cat {IMAGE} {efi.SOURCES[name]} | sha256sum"
                                 ).stdout.split()[0] for name in CHANGED}
    v2 = {rel: v2_sources.get(src, v1[rel]) for rel, src in efi.FILES.items()}
    assert sum(v1[rel] != v2[rel] for rel in efi.FILES) == 4, (v1, v2)
    steps = update_steps(node)
    esp = [s for s in steps if s.startswith("esp-efi-") and not s.endswith("grub.cfg")]
    assert len(esp) == 6
    points = [f"after:{s}" for s in esp] + [f"during:{s}:{t}" for s, t in DURING]
    seen = []
    for point in points:
        cut(node, point)  # the node boots by itself from the ESP it was left
        on_esp = chain_digests(node)
        for rel in efi.FILES:  # whole files only: the old one or the new one
            assert on_esp[rel] in (v1[rel], v2[rel]), (point, rel)
        seen.append((point, sum(on_esp[rel] == v2[rel] != v1[rel] for rel in efi.FILES)))
        assert node.run("imgbase w").stdout.strip() == A, point
        recover_and_check(node)  # recover rewrites the ESP from the booted image (v1)
        assert chain_digests(node) == v1, point
        back_to_v1_only(node)
    # the cuts landed at every stage: nothing new yet, some files new, all four new
    counts = [n for _, n in seen]
    assert 0 in counts and 4 in counts and any(0 < n < 4 for n in counts), seen
    print("\n".join(f"{p:44} {n} of 4 files new at the cut" for p, n in seen))
    st = json.loads(node.run("imgbase status --json").stdout)
    assert [b["name"] for b in st["bases"]] == [NVR] and V2 not in json.dumps(st), st
