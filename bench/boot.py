#!/usr/bin/env python3
"""bench/boot: boot to agent-registered against the same image with the agent disabled;
then the firmware paths and the kernel: BIOS, UEFI and Secure Boot, and the cloud kernel.

One node, installed by `imgbase install` onto a blank disk in a live guest, is set up
twice from that disk: "agent" (an agent.toml pointing at a real etcd on the host's
127.0.0.1, reached through qemu guestfwd) and "no agent" (imgbase-agent masked).
Alternating, each run cold-boots one of them (TCG, a throw-away overlay) and times, from
qemu's start on the host: SSH answering, `systemctl is-system-running` = running (the
boot transaction done, the health gate included), and -- with the agent -- the node's
record in etcd, healthy. Prints medians and the agent's cost.

Firmware (``--firmware``, on by default): the "no agent" disk cold-booted under BIOS,
UEFI (OVMF) and UEFI with Secure Boot (OVMF's Secure Boot code, Microsoft's keys), and a
disk installed from the same image composed with the cloud kernel (``kernel =
"cloud-amd64"`` in the base layer, nothing else changed), under BIOS. Goals printed beside
the figures: Secure Boot <= 1.15x BIOS; the generic kernel <= +10 % boot time and <= +25 %
image size over the cloud kernel's. Writes bench/results/boot.json.

    python bench/boot.py [--runs N] [--no-firmware]   (root; ~2 min per run pair, and
                                                      ~8 min per firmware run)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_result  # noqa: E402
from bench.update import compose, install  # noqa: E402
from imgbase.agent import fleet  # noqa: E402
from imgbase.vm import GUESTFWD_ADDR, Guest, VmSpec  # noqa: E402
from tests.etcdcluster import EtcdCluster, etcd_cluster  # noqa: E402

AGENT_TOML = f"""[cluster]
endpoints = ["http://{GUESTFWD_ADDR}:2379"]
group = "bench"
insecure_http = true
[agent]
ttl = 15
"""


def prepare(disk: Path, work: Path, agent: bool) -> None:
    """Write the variant into the disk itself (no overlay), then power off cleanly."""
    setup = ("mkdir -p /etc/imgbase && "
             f"cat > /etc/imgbase/agent.toml <<'EOF'\n{AGENT_TOML}EOF\n" if agent else
             "systemctl mask imgbase-agent.service")
    with Guest(VmSpec(disk=disk, snapshot=False), rundir=work) as guest:
        guest.run(setup)


def registered(admin: Any) -> bool:
    return any(r.get("healthy") and r.get("group") == "bench"
               for r in fleet.nodes(admin).values())


def one_boot(disk: Path, work: Path, etcd: EtcdCluster, agent: bool,
             firmware: str = "bios") -> dict[str, float]:
    fwd = ((2379, etcd.members[0].client_port),)
    with etcd.client() as admin:
        admin.delete_prefix(f"{fleet.ROOT}/nodes/")  # the run before's record (lease-bound)
        guest = Guest(VmSpec(disk=disk, guestfwd=fwd, firmware=firmware), rundir=work)
        t0 = time.monotonic()
        guest.start()
        try:
            out: dict[str, float] = {}
            guest.wait_ssh()
            out["ssh_s"] = time.monotonic() - t0
            guest.run("systemctl is-system-running --wait", check=False, timeout=600)
            out["running_s"] = time.monotonic() - t0
            if agent:
                while not registered(admin):
                    if time.monotonic() - t0 > 600:
                        raise SystemExit("the agent did not register within 600 s")
                    time.sleep(0.2)
                out["registered_s"] = time.monotonic() - t0
        finally:
            guest.kill()
    return out


def cloud_kernel_sources(work: Path) -> Path:
    """images/ and layers/ with the base layer's kernel = "cloud-amd64" (written by a TOML
    library); the image file to compose."""
    import tomllib

    import tomli_w

    for part in ("images", "layers"):
        shutil.copytree(ROOT / part, work / part)
    base = work / "layers/base.toml"
    data = tomllib.loads(base.read_text())
    data["layer"]["kernel"] = "cloud-amd64"
    base.write_text(tomli_w.dumps(data))
    return work / "images/node.toml"


FIRMWARE_ROWS = ("bios", "uefi", "secureboot", "bios, cloud kernel")


def firmware_bench(runs: int, plain: Path, image: Path, work: Path, etcd: EtcdCluster
                   ) -> dict[str, Any]:
    """The "no agent" disk under each firmware, and a cloud-kernel disk under BIOS."""
    cloud_image = compose(work / "cloud-out", cloud_kernel_sources(work / "cloud-src"))
    cloud_disk = work / "cloud.qcow2"
    install(cloud_image, cloud_disk, work / "cloud-install")
    prepare(cloud_disk, work / "prepare-cloud", False)
    disks = {"bios": plain, "uefi": plain, "secureboot": plain, "bios, cloud kernel": cloud_disk}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in FIRMWARE_ROWS}
    for i in range(runs):
        for name in (FIRMWARE_ROWS if i % 2 == 0 else tuple(reversed(FIRMWARE_ROWS))):
            rundir = work / f"fw{i}-{name.replace(' ', '').replace(',', '-')}"
            firmware = name.split(",")[0]
            rows[name].append(one_boot(disks[name], rundir, etcd, False, firmware))
            shutil.rmtree(rundir, ignore_errors=True)
            print(f"run {i + 1} {name}: {rows[name][-1]}", flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for name, rs in rows.items()}
    sizes = {"generic": image.stat().st_size, "cloud": cloud_image.stat().st_size}
    kernels = {name: json.loads(Path(f"{p.with_suffix('')}.manifest.json").read_text()
                                 )["kernels"] for name, p in (("generic", image),
                                                             ("cloud", cloud_image))}
    return {"runs": rows, "median": med, "image_bytes": sizes, "kernels": kernels,
            "secureboot_vs_bios": med["secureboot"]["running_s"] / med["bios"]["running_s"],
            "generic_vs_cloud_boot": med["bios"]["running_s"]
            / med["bios, cloud kernel"]["running_s"],
            "generic_vs_cloud_size": sizes["generic"] / sizes["cloud"]}


def print_firmware(fw: dict[str, Any]) -> None:
    med = fw["median"]
    print(f"\n{'cold boot from disk (TCG), s':32} {'to SSH':>8} {'running':>8}")
    for name in FIRMWARE_ROWS:
        print(f"{name:32} {med[name]['ssh_s']:8.1f} {med[name]['running_s']:8.1f}")
    gen, cloud = fw["image_bytes"]["generic"], fw["image_bytes"]["cloud"]
    print(f"{'image size, MB':32} generic {gen / 1e6:.0f}, cloud {cloud / 1e6:.0f}")
    for label, value, goal in (
            ("Secure Boot vs BIOS, to running", fw["secureboot_vs_bios"], 1.15),
            ("generic vs cloud kernel, running", fw["generic_vs_cloud_boot"], 1.10),
            ("generic vs cloud kernel, size", fw["generic_vs_cloud_size"], 1.25)):
        verdict = "met" if value <= goal else "NOT met"
        print(f"{label:32} {value:5.2f}x   goal <= {goal:.2f}x: {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-firmware", dest="firmware", action="store_false",
                        help="only the agent's cost, not the firmware and kernel rows")
    args = parser.parse_args()
    fw: dict[str, Any] | None = None
    runs: dict[str, list[dict[str, float]]] = {"agent": [], "no agent": []}
    with tempfile.TemporaryDirectory(prefix="bench-boot.", dir="/var/tmp") as tmp:
        work = Path(tmp)
        v1 = compose(work / "out")
        disks = {"agent": work / "agent.qcow2", "no agent": work / "plain.qcow2"}
        install(v1, disks["agent"], work)
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(disks["agent"]),
                        str(disks["no agent"])], check=True)
        for name, disk in disks.items():
            prepare(disk, work / f"prepare-{name.replace(' ', '-')}", name == "agent")
        with etcd_cluster(work / "etcd") as etcd:
            for i in range(args.runs):
                order = ("agent", "no agent") if i % 2 == 0 else ("no agent", "agent")
                for name in order:
                    rundir = work / f"run{i}-{name.replace(' ', '-')}"
                    runs[name].append(one_boot(disks[name], rundir, etcd, name == "agent"))
                    shutil.rmtree(rundir, ignore_errors=True)
                    print(f"run {i + 1} {name}: {runs[name][-1]}", flush=True)
            if args.firmware:
                fw = firmware_bench(args.runs, disks["no agent"], v1, work, etcd)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for name, rs in runs.items()}
    result = {"runs": runs, "median": med,
              "agent_cost_running_s": med["agent"]["running_s"] - med["no agent"]["running_s"],
              "registered_after_running_s": med["agent"]["registered_s"]
              - med["agent"]["running_s"]}
    print(f"\n{'cold boot from disk (TCG), s':32} {'agent':>8} {'no agent':>9}")
    for key, label in (("ssh_s", "to SSH"), ("running_s", "to system running")):
        print(f"{label:32} {med['agent'][key]:8.1f} {med['no agent'][key]:9.1f}")
    print(f"{'to registered in etcd, healthy':32} {med['agent']['registered_s']:8.1f} "
          f"{'-':>9}")
    print(f"the agent's cost to 'running': {result['agent_cost_running_s']:+.1f} s; "
          f"registered {result['registered_after_running_s']:+.1f} s after 'running'")
    if fw is not None:
        result["firmware"] = fw
        print_firmware(fw)
    write_result("boot", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
