#!/usr/bin/env python3
"""bench/update: a delta update vs a full-copy update on a real thin pool, and rollback.

One node, installed by `imgbase install` onto a blank disk in a live guest, boots from
its disk (TCG). v2 is derived from the composed v1 with about 1 % of its files changed
(tests/images.py). Alternating, each run updates v1 -> v2 as a delta of v1's base (the
default) and as a full copy (--full-copy), timing the whole `imgbase update` (and, from
its --json step events, the part that makes the base) and reading the pool's used bytes
before and after; after each, the v2 layer and base are removed again. Both skip the
signature (--insecure, allowed in the bench node's imgbase.toml); the verified copy and
its hashing are the same for both and are not what is compared. Then `imgbase rollback`
is timed: the command's wall time in the guest and the time of its steps (the grubenv
write, the /boot commit, the history record).

Prints a table with medians and writes bench/results/update.json.

    python bench/update.py [--runs N]      (root; ~10 min with 3 runs)
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_result  # noqa: E402
from imgbase.vm import Guest, VmSpec  # noqa: E402
from tests.images import derive  # noqa: E402

IMAGE = ROOT / "images/node.toml"
NVR, V2 = "imgbase-node-1.0-1", "imgbase-node-1.1-1"


def compose(out: Path, image: Path = IMAGE) -> Path:
    subprocess.run([sys.executable, "-m", "imgbase", "compose", str(image), "-o", str(out)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out / f"{NVR}.squashfs"


# the bench's images are unsigned: the node allows --insecure (imgbase.toml [trust])
ALLOW_INSECURE = ("mkdir -p /etc/imgbase && printf '[trust]\\nallow_insecure = true\\n' "
                  "> /etc/imgbase/imgbase.toml")


def install(image: Path, disk: Path, work: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "20G"], check=True)
    with Guest(VmSpec(live=image, attach=(disk,)), rundir=work / "installer") as guest:
        guest.run(f"{ALLOW_INSECURE} && imgbase install --insecure --disk /dev/vdb",
                  timeout=1200)


def pool_used(guest: Guest) -> int:
    size, pct = guest.run("lvs --noheadings --units b --nosuffix -o lv_size,data_percent "
                          "-S lv_tags=imgbase:pool").stdout.split()
    return int(float(size) * float(pct) / 100)


TIMER = ("python3 -c 'import subprocess, sys, time; t = time.monotonic(); "
         "subprocess.run(sys.argv[1], shell=True, check=True, stdout=subprocess.DEVNULL); "
         "print(time.monotonic() - t)'")


def timed(guest: Guest, command: str) -> float:
    """Seconds the command takes in the guest, timed by the guest's own clock."""
    out = guest.run(f"{TIMER} {shlex.quote(command)}", timeout=1800).stdout
    return float(out.strip().splitlines()[-1])


def one_update(guest: Guest, full: bool) -> dict[str, float]:
    before = pool_used(guest)
    seconds = timed(guest, "imgbase update /var/tmp/v2.squashfs --insecure --json"
                    + (" --full-copy" if full else "") + " > /var/tmp/update-events.json")
    grown = pool_used(guest) - before
    events = [json.loads(e) for e in guest.run("cat /var/tmp/update-events.json").stdout
              .splitlines() if e.startswith("{")]
    steps = {e["step"]: e["seconds"] for e in events if e.get("event") == "step-done"}
    guest.run(f"imgbase boot --set-default {NVR}+1 --no-trial && "
              f"imgbase layer --remove {V2}+1 && imgbase base --remove {V2}")
    return {"seconds": seconds, "pool_growth_mib": grown / (1 << 20),
            # making the base: what a delta and a full copy differ in (the layer, the /etc
            # merge and the boot entry after it are the same work in both)
            "base_seconds": sum(t for name, t in steps.items() if name.startswith("base-")),
            "base_sync_seconds": steps.get("base-sync", steps.get("base-unpack", 0.0))}


def rollback_times(guest: Guest, runs: int) -> tuple[list[float], list[float]]:
    guest.run("imgbase update /var/tmp/v2.squashfs --insecure", timeout=1800)
    wall: list[float] = []
    step: list[float] = []
    for _ in range(runs):
        guest.run(f"imgbase boot --set-default {V2}+1 --no-trial")
        wall.append(timed(guest, f"imgbase rollback --to {NVR}+1"))
        guest.run(f"imgbase boot --set-default {V2}+1 --no-trial")
        events = guest.run(f"imgbase rollback --to {NVR}+1 --json").stdout.splitlines()
        done = [json.loads(e) for e in events if e.startswith("{")]
        # the plan's steps: the grubenv write, the /boot commit, the history record
        step.append(sum(e["seconds"] for e in done if e.get("event") == "step-done"))
    return wall, step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-update.", dir="/var/tmp") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        v1 = compose(work / "out")
        v2 = derive(v1, work, "1.1")
        disk = work / "node.qcow2"
        install(v1, disk, work)
        print(f"set-up (compose, derive v2, install): {time.monotonic() - t0:.0f} s",
              flush=True)
        runs: dict[str, list[dict[str, float]]] = {"delta": [], "full": []}
        with Guest(VmSpec(disk=disk, attach=(v2,)), rundir=work / "node") as guest:
            # a file: a writable disk is not an image imgbase verifies
            guest.run(f"{ALLOW_INSECURE} && cat /dev/vdb > /var/tmp/v2.squashfs")
            for i in range(args.runs):
                for kind in ("delta", "full") if i % 2 == 0 else ("full", "delta"):
                    runs[kind].append(one_update(guest, kind == "full"))
                    print(f"run {i + 1} {kind}: {runs[kind][-1]}", flush=True)
            wall, step = rollback_times(guest, max(args.runs, 5))
    metrics = ("seconds", "base_seconds", "base_sync_seconds", "pool_growth_mib")
    med = {k: {m: statistics.median(r[m] for r in v) for m in metrics}
           for k, v in runs.items()}
    result = {
        "runs": runs, "median": med,
        "ratio_time": med["full"]["seconds"] / med["delta"]["seconds"],
        "ratio_base_time": med["full"]["base_seconds"] / med["delta"]["base_seconds"],
        "ratio_pool": med["full"]["pool_growth_mib"] / max(med["delta"]["pool_growth_mib"], 1),
        "rollback_wall_s": statistics.median(wall),
        "rollback_step_s": statistics.median(step) if step else None,
    }
    print(f"\n{'v1 -> v2 (~1 % of files)':28} {'delta':>10} {'full copy':>10} {'ratio':>7}")
    print(f"{'wall time (s)':28} {med['delta']['seconds']:10.1f} "
          f"{med['full']['seconds']:10.1f} {result['ratio_time']:7.1f}x")
    print(f"{'  of which the base (s)':28} {med['delta']['base_seconds']:10.1f} "
          f"{med['full']['base_seconds']:10.1f} {result['ratio_base_time']:7.1f}x")
    print(f"{'  sync / unpack step (s)':28} {med['delta']['base_sync_seconds']:10.1f} "
          f"{med['full']['base_sync_seconds']:10.1f}")
    print(f"{'pool growth (MiB)':28} {med['delta']['pool_growth_mib']:10.0f} "
          f"{med['full']['pool_growth_mib']:10.0f} {result['ratio_pool']:7.1f}x")
    print(f"rollback: {result['rollback_wall_s']:.2f} s for the command (python start-up "
          f"under TCG included), {result['rollback_step_s'] or 0:.3f} s for the switch itself")
    write_result("update", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
