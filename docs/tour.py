#!/usr/bin/env python3
"""The README's five-minute tour, run for real: its output is what this script saw.

Composes the default image (the compose cache answers when nothing changed), installs it
onto a blank disk with `imgbase vm --run 'imgbase install ...'`, boots that disk, and on
the node runs what a new admin would try: status, check, an update's report, the update,
a reboot onto v2, and a rollback. v2 is the image with about 1 % of its files changed
(tests/images.py), signed with a throw-away key that the node is given to trust.

    python docs/tour.py              (root; ~5 min under TCG) prints the transcript
    python docs/tour.py --readme README.md   also puts it between the README's tour markers
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imgbase.image import trust  # noqa: E402
from imgbase.run import run  # noqa: E402
from imgbase.vm import Guest, VmSpec  # noqa: E402
from tests.images import derive, signing_key, stop_agent  # noqa: E402

BEGIN, END = "<!-- tour: begin (docs/tour.py writes this part) -->", "<!-- tour: end -->"
NVR, V2 = "imgbase-node-1.0-1", "imgbase-node-1.1-1"
MEDIA = "/mnt/updates"
MAX_LINES = 24  # per command; longer outputs keep their head and tail


def shown(text: str) -> list[str]:
    lines = text.rstrip("\n").splitlines()
    if len(lines) <= MAX_LINES:
        return lines
    half = MAX_LINES // 2
    return [*lines[:half], f"[... {len(lines) - 2 * half} lines ...]", *lines[-half:]]


class Transcript:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def text(self, paragraph: str) -> None:
        self.parts.append(paragraph.strip() + "\n")

    def console(self, prompt: str, command: str, output: str) -> None:
        self.parts.append("```console\n" + "\n".join([f"{prompt} {command}", *shown(output)])
                          + "\n```\n")

    def host(self, argv: list[str], shown_as: str) -> str:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{shown_as} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        self.console("$", shown_as, proc.stdout + proc.stderr)
        return proc.stdout

    def node(self, guest: Guest, command: str, timeout: float = 1200) -> str:
        result = guest.run(command, timeout=timeout)
        self.console("node#", command, result.stdout + result.stderr)
        return result.stdout

    def markdown(self) -> str:
        return "\n".join(self.parts)


def tour(work: Path) -> str:
    t = Transcript()
    imgbase = [sys.executable, "-m", "imgbase"]
    out = work / "out"
    t.text("Compose the default node image (a minute or so; the cache answers at once when "
           "no input changed):")
    t.host([*imgbase, "compose", "images/node.toml", "-o", str(out)],
           "imgbase compose images/node.toml -o out")
    image = out / f"{NVR}.squashfs"
    disk = work / "node.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "20G"])
    updates = work / "updates"
    updates.mkdir()
    home = signing_key(work / "gnupg", updates / "site.gpg")
    t.text("Sign it (a throw-away key here; a site keeps its own):")
    t.host([*imgbase, "sign", str(image), "--homedir", str(home)],
           f"imgbase sign out/{image.name}")
    t.text("Install it onto a blank 20 GB disk, from the image booted live in qemu, which "
           "is given the image's .sha256 and .sig and the key to check them with:")
    t.host([*imgbase, "vm", "--live", str(image), "--trust", str(updates / "site.gpg"),
            "--attach", str(disk), "--run", "imgbase install --disk /dev/vdb"],
           f"imgbase vm --live out/{image.name} --trust site.gpg --attach node.qcow2 "
           "--run 'imgbase install --disk /dev/vdb'")

    v2 = derive(image, updates, "1.1")
    trust.sign(str(v2), homedir=str(home))
    stop_agent(home)
    media = work / "updates.squashfs"
    run(["mksquashfs", str(updates), str(media), "-quiet", "-no-progress"])

    t.text(f"Boot the installed disk (`imgbase vm --disk node.qcow2`), with v2 -- the same "
           f"image with about 1 % of its files changed, signed -- on a second disk mounted "
           f"at {MEDIA}. On the node:")
    with Guest(VmSpec(disk=disk, attach=(media,)), rundir=work / "node") as guest:
        guest.run(f"mkdir -p {MEDIA} && mount -o ro /dev/vdb {MEDIA} && "
                  "systemctl is-system-running --wait", check=False)
        t.node(guest, "imgbase status")
        t.node(guest, "imgbase check")
        t.text("Trust the key the images are signed with, then ask what an update would do:")
        t.node(guest, f"install -D -m 644 {MEDIA}/site.gpg /etc/imgbase/trusted.d/site.gpg")
        t.node(guest, f"imgbase update {MEDIA}/{V2}.squashfs --check")
        t.text("Update: a new base (a thin snapshot of v1's, only the changed files written) "
               "and a layer with this node's /etc, users and kernel arguments carried over; "
               "it becomes the default, on trial, in its last step:")
        t.node(guest, f"imgbase update {MEDIA}/{V2}.squashfs")
        guest.reboot()
        guest.run("systemctl is-system-running --wait", check=False, timeout=600)
        t.text("After a reboot, the node runs v2; its health gate marked it good:")
        t.node(guest, "imgbase status")
        t.text("Rolling back is one grubenv write, planned first:")
        t.node(guest, "imgbase rollback --dry-run")
        t.node(guest, "imgbase rollback")
    return t.markdown()


def put_in_readme(readme: Path, text: str) -> None:
    old = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(old):
        raise SystemExit(f"{readme}: no tour markers ({BEGIN} ... {END})")
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", old))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", type=Path, help="write the transcript into this README")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgbase-tour.", dir="/var/tmp") as tmp:
        text = tour(Path(tmp))
    print(text)
    if args.readme:
        put_in_readme(args.readme, text)
        print(f"written into {shlex.quote(str(args.readme))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
