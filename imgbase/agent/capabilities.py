"""What this host offers, read through libvirt-python: published with the node's record.

``collect()`` asks libvirt (read-only connection to ``qemu:///system``); ``summarize()`` is
the pure part, over the capabilities XML and the numbers libvirt returns, so it is tested
without a hypervisor and then for real in a guest.

>>> caps = '''<capabilities><host><cpu><arch>x86_64</arch><model>Skylake-Client</model>
... </cpu><topology><cells num='2'><cell id='0'><memory unit='KiB'>1024</memory></cell>
... <cell id='1'><memory unit='KiB'>2048</memory></cell></cells></topology></host>
... <guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/>
... <domain type='kvm'/></arch></guest></capabilities>'''
>>> s = summarize(caps, [0, 3, 4], 9000000, 7002000, 1)
>>> s["arch"], s["cpu_model"], s["virt_types"], s["accelerated"], s["numa_cells"]
('x86_64', 'Skylake-Client', ['kvm', 'tcg'], True, 2)
>>> s["memory_mib"], s["cpus"], s["libvirt_version"], s["qemu_version"], s["running_domains"]
(3, 4, '9.0.0', '7.2.0', 1)
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from ..node import virt
from ..node.virt import URI


def version(n: int) -> str:
    """libvirt's packed version number: major * 1,000,000 + minor * 1,000 + release."""
    return f"{n // 1_000_000}.{n // 1_000 % 1_000}.{n % 1_000}"


def summarize(caps_xml: str, info: list[Any], lib_version: int, qemu_version: int,
              running: int) -> dict[str, Any]:
    root = ET.fromstring(caps_xml)
    host = root.find("host")
    cpu = host.find("cpu") if host is not None else None
    cells = root.findall("./host/topology/cells/cell")
    types = {d.get("type") for d in root.findall("./guest/arch/domain")}
    virt = sorted({"tcg" if t == "qemu" else str(t) for t in types if t})
    return {
        "arch": cpu.findtext("arch") if cpu is not None else None,
        "cpu_model": cpu.findtext("model") if cpu is not None else None,
        "virt_types": virt,
        "accelerated": "kvm" in virt,
        "memory_mib": int(info[1]),
        "cpus": int(info[2]),
        "numa_cells": len(cells) or 1,
        "libvirt_version": version(lib_version),
        "qemu_version": version(qemu_version),
        "running_domains": running,
    }


def collect(uri: str = URI) -> dict[str, Any]:
    """Ask libvirt; an ImgbaseError with libvirt's message when it cannot answer."""
    with virt.connection(uri) as conn:
        return summarize(conn.getCapabilities(), conn.getInfo(), conn.getLibVersion(),
                         conn.getVersion(), conn.numOfDomains())
