"""The development VM's Vagrantfile, evaluated by Ruby against a recorder (no Vagrant or
KVM here): it must be valid Ruby, set up with the project's own `make setup`, and run the
very command CI runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def evaluated() -> dict[str, Any]:
    out = subprocess.run(["ruby", str(ROOT / "tests/unit/vagrant_stub.rb"),
                          str(ROOT / "Vagrantfile")], capture_output=True, text=True,
                         check=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def provisioners(conf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["args"][0]: c["kwargs"] for c in conf["calls"] if c["call"] == "vm.provision"}


def test_a_debian_12_vm_for_libvirt_and_virtualbox() -> None:
    conf = evaluated()
    assert conf["version"] == "2"
    assert conf["settings"]["vm.box"] == "debian/bookworm64"
    providers = {c["args"][0] for c in conf["calls"] if c["call"] == "vm.provider"}
    assert providers == {"libvirt", "virtualbox"}
    assert conf["settings"]["vm.provider.libvirt.memory"] >= 4096


def test_set_up_by_the_project_itself_and_tested_as_ci_does() -> None:
    prov = provisioners(evaluated())
    setup = prov["setup"]["inline"]
    subprocess.run(["bash", "-n"], input=setup, text=True, check=True)  # valid shell
    assert setup.rstrip().endswith("cd /vagrant && make setup")
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith("set ")]
    assert prov["test"]["inline"].endswith(ci[-1].split("&&")[-1].strip().removeprefix("exec "))
    assert prov["test"]["run"] == "never"


def test_the_synced_tree_leaves_out_local_state() -> None:
    folder = next(c for c in evaluated()["calls"] if c["call"] == "vm.synced_folder")
    assert folder["args"] == [".", "/vagrant"]
    assert {".venv/", "out/"} <= set(folder["kwargs"]["rsync__exclude"])
