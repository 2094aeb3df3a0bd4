"""`imgbase install`: a node onto a blank disk, without anaconda.

Plan, then apply: ``gather_facts`` checks the disk and image (refusing before
anything is written), ``plan_install`` is pure (facts in, steps out) and is what
``--dry-run`` prints and ``--json`` emits; ``plan.execute`` runs it.

Disk layout (GPT): 1 BIOS boot (1 MiB, grub-pc's core), 2 the EFI system partition
(FAT32, 256 MiB, at /boot/efi: shim -> signed grub, see :mod:`imgbase.bootloader.efi`),
3 /boot (ext4, 1 GiB: the one menu, kernels), 4 LVM PV. One disk boots under BIOS, UEFI
and UEFI with Secure Boot; an NVRAM entry is added when EFI variables are writable. The
volume group
(tag imgbase:vg) holds a thin pool (imgbase:pool), the image's base LV
(<nvr>, read-only, activation skipped, imgbase:base), its first layer
(<nvr>+1, writable thin snapshot, imgbase:layer) and the volumes
(imgbase:volume): /var always, the NIST set with --volumes nist.

The image is verified before anything reads it (:func:`imgbase.image.trust.verified_copy`): its
``.sha256`` signed by a key in /etc/imgbase/trusted.d, unless ``--insecure`` where
imgbase.toml allows it. In the live environment the image is the running one, read from
its read-only device, and its sidecars are ``/run/imgbase/live/image.sha256`` and
``.sig`` (``imgbase vm --live`` puts them there from next to the image; ``--sha256``
names others). The new base is tagged with the signing key, and the node's record of
accepted images (anti-rollback, ``/var/lib/imgbase/accepted.json``) starts with it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import bootloader, netconf
from ..bootloader import efi, grub
from ..errors import die
from ..image import squashfs
from ..image.kargs import for_new_node
from ..image.naming import Layer, Nvr
from ..image.trust import ACCEPTED, Verified, accepted_step, verified_copy, with_key
from ..plan import Plan, Step
from ..run import run
from ..storage.layout import (
    THIN_PROFILE,
    base_from_image_steps,
    layer_create_steps,
    layer_finish_steps,
    rewrite_fstab,
    volume_steps,
)
from ..storage.lvm import TAG_POOL, TAG_VG

GIB = 1 << 30
MIN_DISK = 8 * GIB
RESERVED = 1282 * (1 << 20)  # partitions 1-3 and the GPT
WORK = Path("/run/imgbase/install")
JOURNAL = Path("/run/imgbase/install.journal")  # the live environment: /run
LIVE_SUMS = Path("/run/imgbase/live/image.sha256")  # the running image's, and its .sig
VOLUME_PROFILES: dict[str, list[tuple[str, str, str]]] = {
    # (mount point, LV name, size)
    "minimal": [("/var", "var", "4G")],
    "nist": [("/var", "var", "4G"), ("/var/log", "var_log", "2G"),
             ("/var/log/audit", "var_log_audit", "1G"), ("/var/crash", "var_crash", "2G"),
             ("/var/tmp", "var_tmp", "1G"), ("/home", "home", "1G"), ("/tmp", "tmp", "1G")],
}


@dataclass(frozen=True)
class InstallFacts:
    disk: str
    disk_size: int
    image: str
    nvr: str
    kernel: str  # version, e.g. 6.1.0-56-cloud-amd64
    kernel_args: tuple[str, ...] = ()
    vg: str = "imgbase"
    volumes: str = "minimal"
    pool_size: str | None = None  # e.g. "20G"; default 90% of the free space
    base_size: str = "8G"
    grub_target: str = "i386-pc"
    wipe_vgs: tuple[str, ...] = ()  # volume groups on the disk that --wipe removes first
    extra: dict[str, str] = field(default_factory=dict)
    join: JoinConfig | None = None  # the agent's cluster, written into the first layer
    menu_timeout: int | None = None  # GRUB's menu wait in seconds; None: grub.cfg's 2
    key: str | None = None  # the image's signing key: tagged on the base
    boot_uuid: str = "00000000-0000-4000-8000-000000000000"  # /boot's ext4 UUID (mkfs -U)
    esp_id: str = "00000000"  # the ESP's FAT volume id (mkfs.vfat -i)
    efi_vars: bool = False  # EFI variables are writable here: add an NVRAM boot entry
    network: netconf.Network = netconf.DEFAULT
    primary_mac: str | None = None  # the NIC the installer reached the network through


@dataclass(frozen=True)
class JoinConfig:
    """`install --join`: the agent's config file and the TLS files copied next to it."""

    agent_toml: str
    files: tuple[tuple[str, str, int], ...] = ()  # (source, path on the node, mode)


AGENT_DIR = "/etc/imgbase/agent"


def join_config(endpoints: str, group: str, ca: str | None, cert: str | None,
                key: str | None, *, user: str | None = None, password_file: str | None = None,
                insecure_http: bool = False) -> JoinConfig:
    """Check --join, its TLS files and the etcd password file, before anything is written:
    every value is checked by the agent's parser and written by a TOML library (Join)."""
    from . import agentconfig as agent_config

    if not insecure_http and not (user and password_file):
        die("--join needs the node's etcd user: --etcd-user and --etcd-password-file",
            hint="imgbase fleet add-node NODE makes them; --insecure-http for a lab "
            "without auth")
    files = []
    for src, name, mode in ((ca, "ca.pem", 0o644), (cert, "node.pem", 0o644),
                            (key, "node-key.pem", 0o600), (password_file, "etcd-password", 0o600)):
        if src is None:
            continue
        if not os.path.isfile(src):
            die(f"{src}: no such file", hint="give the TLS and password files as paths "
                "readable here")
        files.append((src, f"{AGENT_DIR}/{name}", mode))
    given = {name for src, name in ((ca, "ca.pem"), (cert, "node.pem"), (key, "node-key.pem"),
                                    (password_file, "etcd-password")) if src}

    def on_node(name: str) -> str | None:
        return f"{AGENT_DIR}/{name}" if name in given else None

    text = agent_config.Join(
        tuple(e for e in endpoints.split(",") if e), group, ca=on_node("ca.pem"),
        cert=on_node("node.pem"), key=on_node("node-key.pem"), user=user,
        password_file=on_node("etcd-password"), insecure_http=insecure_http
    ).agent_toml(where="--join")
    return JoinConfig(text, tuple(files))


def join_steps(join: JoinConfig, root: Path) -> list[Step]:
    steps = [Step("agent-config", write=(f"{root}/etc/imgbase/agent.toml", join.agent_toml))]
    for src, dest, mode in join.files:
        steps.append(Step(f"agent-{Path(dest).name}",
                          ("install", "-D", "-m", f"{mode:o}", src, f"{root}{dest}")))
    return steps


LIBVIRT_NETWORKS = "etc/libvirt/qemu/networks"


def libvirt_bridge_network(bridge: str) -> str:
    """libvirt's network ``default`` as the host bridge: new domains (virt-install, Cockpit)
    get a tap on it, on the LAN, instead of NAT behind virbr0.

    >>> print(libvirt_bridge_network("br0"), end="")
    <network><name>default</name><forward mode="bridge" /><bridge name="br0" /></network>
    """
    import xml.etree.ElementTree as ET

    net = ET.Element("network")
    ET.SubElement(net, "name").text = "default"
    ET.SubElement(net, "forward", mode="bridge")
    ET.SubElement(net, "bridge", name=bridge)
    return ET.tostring(net, encoding="unicode") + "\n"


def network_steps(net: netconf.Network, primary_mac: str | None, root: Path) -> list[Step]:
    """The node's network into the first layer's /etc/systemd/network (the /etc merge
    carries it across updates), and libvirt's default network onto its first bridge
    (the one with the primary NIC when there is one)."""
    steps = [Step(f"network-{name}", write=(f"{root}/{netconf.NETWORK_DIR}/{name}", text))
             for name, text in netconf.render(net, primary_mac).items()]
    if net.bridges:
        bridge = next((b.name for b in net.bridges if netconf.PRIMARY in b.ports),
                      net.bridges[0].name)
        xml = f"{root}/{LIBVIRT_NETWORKS}/default.xml"
        steps += [Step("libvirt-network", write=(xml, libvirt_bridge_network(bridge))),
                  Step("libvirt-network-autostart",
                       ("sh", "-c", 'mkdir -p "${2%/*}" && ln -sfn "$1" "$2"', "autostart",
                        f"/{LIBVIRT_NETWORKS}/default.xml",
                        f"{root}/{LIBVIRT_NETWORKS}/autostart/default.xml"))]
    return steps


def nics() -> dict[str, str]:
    """The machine's physical NICs: name -> permanent MAC address."""
    out = {}
    for dev in sorted(Path("/sys/class/net").iterdir()):
        if not (dev / "device").exists():
            continue  # lo, bridges, bonds, taps
        info = json.loads(run(["ip", "-j", "-d", "link", "show", "dev", dev.name]).stdout)[0]
        out[dev.name] = str(info.get("permaddr") or info.get("address", "")).lower()
    return out


def primary_nic(found: dict[str, str]) -> str | None:
    """The NIC of the default route, else the first NIC."""
    routes = json.loads(run(["ip", "-j", "route", "show", "default"]).stdout or "[]")
    for r in routes:
        if r.get("dev") in found:
            return str(r["dev"])
    return next(iter(found), None)


def check_network(net: netconf.Network, found: dict[str, str]) -> str | None:
    """Every NIC the network names is here; returns the primary NIC's MAC (None: the
    network does not use it)."""
    macs = set(found.values())
    virtual = net.virtual
    named = [p for d in net.masters for p in d.ports] + [v.link for v in net.vlans]
    for port in named:
        if port in virtual or port == netconf.PRIMARY:
            continue
        if port.startswith("mac:") and port[4:] not in macs or \
                not port.startswith("mac:") and port not in found:
            die(f"the network names NIC {port}, and this machine has no such NIC",
                hint=f"NICs here: {', '.join(f'{n} ({m})' for n, m in found.items()) or 'none'}")
    primary = primary_nic(found) if net.uses_primary else None
    if net.uses_primary and primary is None:
        die("the network bridges the primary NIC, and this machine has no NIC",
            hint="give --network a file naming the node's NICs")
    # one NIC, one master: "primary", mac:... and its name may all be the same NIC
    by_mac: dict[str, str] = {}
    for port in named:
        if port in virtual:
            continue
        mac = (found[primary] if port == netconf.PRIMARY and primary else
               port[4:] if port.startswith("mac:") else found.get(port, port))
        if mac in by_mac and by_mac[mac] != port:
            die(f"the network names one NIC twice: {by_mac[mac]} and {port} are both {mac}",
                hint="name each NIC once")
        by_mac[mac] = port
    return found[primary] if primary else None


def partition(disk: str, n: int) -> str:
    """Path of partition n of disk.

    >>> partition("/dev/vdb", 3), partition("/dev/nvme0n1", 3)
    ('/dev/vdb3', '/dev/nvme0n1p3')
    """
    return f"{disk}{'p' if disk[-1].isdigit() else ''}{n}"


def plan_install(f: InstallFacts) -> Plan:
    """Every step of an install, in order; pure."""
    nvr = str(Nvr.parse(f.nvr))
    layer = str(Layer(Nvr.parse(nvr), 1))
    vg, esp_part, boot_part, pv = (f.vg, partition(f.disk, 2), partition(f.disk, 3),
                                   partition(f.disk, 4))
    base_mnt, root_mnt, boot_mnt = WORK / "base", WORK / "root", WORK / "boot"
    pool = ["-L", f.pool_size] if f.pool_size else ["-l", "90%FREE"]
    steps = [
        *(Step(f"deactivate-{old}", ("vgchange", "-an", old)) for old in f.wipe_vgs),
        *(Step(f"remove-vg-{old}", ("vgremove", "-ff", "-y", old)) for old in f.wipe_vgs),
        Step("wipe", ("wipefs", "--all", "--force", f.disk)),
        Step("partition", ("sgdisk", "--zap-all", "-n1:1M:+1M", "-t1:EF02", "-c1:bios",
                           "-n2:0:+256M", "-t2:EF00", "-c2:esp", "-n3:0:+1G", "-t3:8300",
                           "-c3:boot", "-n4:0:0", "-t4:8E00", "-c4:imgbase", f.disk)),
        Step("settle", ("udevadm", "settle")),
        Step("mkfs-esp", ("mkfs.vfat", "-F", "32", "-n", "ESP", "-i", f.esp_id, esp_part)),
        Step("mkfs-boot", ("mkfs.ext4", "-q", "-F", "-L", "boot", "-U", f.boot_uuid,
                           boot_part)),
        Step("pv", ("pvcreate", "-ff", "-y", pv)),
        Step("vg", ("vgcreate", "-y", "--addtag", TAG_VG, vg, pv)),
        Step("pool", ("lvcreate", "-y", "--type", "thin-pool", *pool, "--addtag", TAG_POOL,
                      "--metadataprofile", THIN_PROFILE, "-n", "pool", vg)),
        *with_key(base_from_image_steps(vg, nvr, f.image, f.base_size, base_mnt), vg, nvr,
                  f.key),
    ]
    volumes = [(mp, f"/dev/{vg}/{lv}") for mp, lv, _ in VOLUME_PROFILES[f.volumes]]
    fstab = rewrite_fstab(f"LABEL=boot /boot ext4 defaults 0 2\n{efi.fstab_line(f.esp_id)}\n",
                          f"/dev/{vg}/{layer}", volumes)
    steps += layer_create_steps(vg, nvr, layer, root_mnt, fstab)
    # the anti-rollback record starts with this image (in the layer's /var, which the
    # /var volume is filled from next)
    steps.append(accepted_step({}, Nvr.parse(nvr), root_mnt / ACCEPTED.relative_to("/")))
    for mountpoint, lv, size in VOLUME_PROFILES[f.volumes]:
        steps += volume_steps(vg, lv, mountpoint, size, root_mnt / mountpoint.lstrip("/"),
                              WORK / f"vol-{lv}")
    kargs = for_new_node(f.kernel_args)
    steps += [
        Step("mount-boot", ("sh", "-c", 'mkdir -p "$2" && mount "$1" "$2"', "mount", boot_part,
                            str(boot_mnt))),
        Step("grub-install", ("grub-install", f"--target={f.grub_target}",
                              f"--boot-directory={boot_mnt}", f.disk)),
        Step("grub-cfg", write=(f"{boot_mnt}/grub/grub.cfg",
                                bootloader.grub_cfg(layer, f.boot_uuid))),
        *bootloader.add_entry_steps(boot_mnt, layer, f"/dev/{vg}/{layer}", kargs,
                                    root_mnt / f"boot/vmlinuz-{f.kernel}",
                                    root_mnt / f"boot/initrd.img-{f.kernel}", {}),
        bootloader.kernel_files_step(root_mnt, boot_mnt, nvr, "rescue-files"),
        *bootloader.rescue_steps(boot_mnt, vg, [nvr], f.boot_uuid, kargs),
        bootloader.set_default_step(boot_mnt, layer, {} if f.menu_timeout is None
                                    else grub.menu_timeout_env(f.menu_timeout)),
        Step("mount-esp", ("sh", "-c", 'mkdir -p "$2" && mount "$1" "$2"', "mount", esp_part,
                           str(boot_mnt / "efi"))),
        *efi.sync_steps(boot_mnt / "efi", root_mnt, f.boot_uuid, nvr),
        Step("umount-esp", ("umount", str(boot_mnt / "efi"))),
        Step("umount-boot", ("umount", str(boot_mnt))),
        *(join_steps(f.join, root_mnt) if f.join else []),
        *network_steps(f.network, f.primary_mac, root_mnt),
        *layer_finish_steps(vg, layer, root_mnt),
        Step("deactivate", ("vgchange", "-an", vg)),
        *([efi.boot_entry_step(f.disk, 2)] if f.efi_vars else []),
    ]
    return Plan("install", tuple(steps),
                failure_hint="the disk is not bootable; run the install again with --wipe")


# -- facts: what the planner needs, gathered (and checked) before anything is written ----

def running_image() -> str:
    """The squashfs the live environment runs from (the lower of the live overlay)."""
    with open("/proc/self/mounts") as f:
        for line in f:
            src, target = line.split()[:2]
            if target == "/run/imgbase/live/lower":
                return src
    die("no image given and this is not a live imgbase environment",
        hint="give the image: imgbase install --disk DEV IMAGE.squashfs")


SIZE_RE = re.compile(r"^[1-9][0-9]*[MGT]$")


def parse_size(text: str) -> int:
    """Bytes of an LVM-style size with a unit.

    >>> parse_size("20G"), parse_size("512M")
    (21474836480, 536870912)
    """
    if not SIZE_RE.match(text):
        die(f"{text!r} is not a size", hint="give a whole number with M, G or T, e.g. 20G")
    return int(text[:-1]) << {"M": 20, "G": 30, "T": 40}[text[-1]]


def verify(image: str | None, *, insecure: bool, sums: str | None = None) -> Verified:
    """The image given, or the running one, verified (trust.verified_copy)."""
    if image is None:
        return verified_copy(running_image(), insecure=insecure,
                             sums=Path(sums) if sums else LIVE_SUMS)
    if not os.path.isfile(image):
        die(f"{image}: no such image", hint="give the .squashfs made by imgbase compose")
    return verified_copy(image, insecure=insecure, sums=Path(sums) if sums else None)


def gather_facts(disk: str, verify_image: Callable[[], Verified], *, volumes: str,
                 pool_size: str | None, wipe: bool, vg: str = "imgbase",
                 join: JoinConfig | None = None, menu_timeout: int | None = None,
                 network: netconf.Network | None = None) -> tuple[InstallFacts, Verified]:
    """verify_image: called once the disk passed its checks; returns the Verified image
    (whose copy the caller discards when the install is done)."""
    if menu_timeout is not None:
        grub.menu_timeout_env(menu_timeout)  # checked before anything else
    network = network or netconf.DEFAULT
    primary_mac = check_network(network, nics())
    try:
        mode = os.stat(disk).st_mode
    except FileNotFoundError:
        die(f"{disk}: no such disk", hint="lsblk lists the disks")
    if not stat.S_ISBLK(mode):
        die(f"{disk} is not a block device", hint="give a whole disk, e.g. /dev/vdb")
    size = int(run(["blockdev", "--getsize64", disk]).stdout)
    if size < MIN_DISK:
        die(f"{disk} is too small: {size / GIB:.1f} GiB, at least {MIN_DISK / GIB:.0f} GiB "
            "needed", hint="use a larger disk")
    if pool_size is not None and parse_size(pool_size) > size - RESERVED:
        die(f"--pool-size {pool_size} does not fit on {disk} ({size / GIB:.1f} GiB, of which "
            f"{(size - RESERVED) / GIB:.1f} GiB is left for LVM)",
            hint="give a smaller --pool-size, or leave it out for 90% of the space")
    tree = json.loads(run(["lsblk", "-J", "-b", "-o", "NAME,PATH,MOUNTPOINT,FSTYPE", disk]
                          ).stdout)["blockdevices"]
    mounted = [f"{d['path']} on {d['mountpoint']}" for d in _walk(tree) if d.get("mountpoint")]
    if mounted:
        die(f"{disk} is in use: {', '.join(mounted)} mounted", hint="unmount it first")
    pvs = {d["path"] for d in _walk(tree) if d.get("fstype") == "LVM2_member"}
    if pvs and not wipe:
        die(f"{disk} is in use by LVM: physical volume {', '.join(sorted(pvs))}, perhaps a node",
            hint="add --wipe to destroy everything on it")
    rows = json.loads(run(["pvs", "--reportformat", "json", "-o", "pv_name,vg_name"]).stdout
                      )["report"][0]["pv"]
    on_disk = tuple(sorted({r["vg_name"] for r in rows if r["pv_name"] in pvs and r["vg_name"]}))
    elsewhere = {r["vg_name"] for r in rows if r["pv_name"] not in pvs}
    if vg in elsewhere:
        die(f"a volume group named {vg} already exists on another disk",
            hint="name this node's volume group with --vg NAME")
    image = verify_image()
    try:
        kernel = image_kernel(str(image.path))
        efi_files(str(image.path))
    except BaseException:
        image.discard()
        raise
    return InstallFacts(disk=disk, disk_size=size, image=str(image.path), nvr=image.nvr,
                        kernel=kernel, kernel_args=image.kernel_args, vg=vg,
                        volumes=volumes, pool_size=pool_size, wipe_vgs=on_disk, join=join,
                        menu_timeout=menu_timeout, key=image.key, boot_uuid=str(uuid.uuid4()),
                        esp_id=secrets.token_hex(4).upper(), efi_vars=efi_vars_writable(),
                        network=network, primary_mac=primary_mac), image


def _walk(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for d in devices:
        out.append(d)
        out += _walk(d.get("children", []))
    return out


def efi_vars_writable() -> bool:
    """EFI variables can take a boot entry: booted by UEFI, efivarfs mounted read-write."""
    vars_dir = "/sys/firmware/efi/efivars"
    return os.path.ismount(vars_dir) and os.access(vars_dir, os.W_OK)


def efi_files(image: str) -> None:
    """Refuse an image that lacks the UEFI boot chain (before anything is written)."""
    if not efi.image_has_chain(image):
        die(f"{image} has no UEFI boot chain (/usr/lib/shim, the signed grub): a node must "
            "boot under UEFI and Secure Boot", hint="compose the image with the base "
            "layer's shim-signed and grub-efi-amd64-signed")


def image_kernel(image: str) -> str:
    """The newest kernel version in a (verified) image's /boot."""
    listing = squashfs.names(image, "boot")
    kernels = sorted(p.removeprefix("/boot/vmlinuz-") for p in listing
                     if p.startswith("/boot/vmlinuz-"))
    if not kernels:
        die(f"{image} has no kernel in /boot", hint="compose the image with a kernel package")
    return kernels[-1]


