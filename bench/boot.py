#!/usr/bin/env python3
"""bench/boot: boot to agent-registered, against the same image with the agent disabled.

One node, installed by `imgbase install` onto a blank disk in a live guest, is set up
twice from that disk: "agent" (an agent.toml pointing at a real etcd on the host's
127.0.0.1, reached through qemu guestfwd) and "no agent" (imgbase-agent masked).
Alternating, each run cold-boots one of them (TCG, a throw-away overlay) and times, from
qemu's start on the host: SSH answering, `systemctl is-system-running` = running (the
boot transaction done, the health gate included), and -- with the agent -- the node's
record in etcd, healthy. Prints medians and the agent's cost, writes
bench/results/boot.json.

    python bench/boot.py [--runs N]      (root; ~2 min per run pair)
"""

from __future__ import annotations

import argparse
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


def one_boot(disk: Path, work: Path, etcd: EtcdCluster, agent: bool) -> dict[str, float]:
    fwd = ((2379, etcd.members[0].client_port),)
    with etcd.client() as admin:
        admin.delete_prefix(f"{fleet.ROOT}/nodes/")  # the run before's record (lease-bound)
        guest = Guest(VmSpec(disk=disk, guestfwd=fwd), rundir=work)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
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
    write_result("boot", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
