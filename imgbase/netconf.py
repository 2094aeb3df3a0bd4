"""The node's network, declared in TOML and rendered to systemd-networkd files.

A hypervisor's VMs reach the LAN through a Linux bridge that holds the node's own address.
The ``[network]`` table (of imgbase.toml, or of the file ``imgbase install --network``
reads) declares bridges, bonds and VLANs; each interface that is no other's port gets DHCP
(the default) or static addresses, a gateway, routes and DNS::

    [network]
    dns = ["192.0.2.53"]                  # for every interface with an address
    [network.bridges.br0]
    ports = ["bond0"]                     # NIC names, bonds, VLANs, "primary", "mac:..."
    addresses = ["192.0.2.10/24"]         # no addresses: DHCP
    gateway = "192.0.2.1"
    routes = [{ to = "10.0.0.0/8", via = "192.0.2.254" }]
    [network.bonds.bond0]
    mode = "802.3ad"
    ports = ["eno1", "eno2"]
    [network.vlans.vlan100]
    id = 100
    link = "bond0"

With no ``[network]`` table the node gets :data:`DEFAULT`: bridge ``br0`` over the primary
NIC (the one the installer reached the network through), by DHCP. ``primary`` and
``mac:`` ports are matched by the NIC's permanent MAC address, so a rename of the NIC by a
new kernel or firmware does not unbridge the node.

Every name and value is checked here (interface names, addresses with the ``ipaddress``
module, VLAN ids, bond modes) and the files are written from the checked values only, in
networkd's fixed ``Key=value`` form; nothing else of the input reaches a file.

>>> net = parse({"bridges": {"br0": {"ports": ["primary"]}}})
>>> files = render(net, primary_mac="52:54:00:12:34:56")
>>> sorted(files)
['10-imgbase-br0.netdev', '10-imgbase-port-primary.network', '11-imgbase-br0.network']
>>> print(files["10-imgbase-port-primary.network"], end="")
# written by imgbase from the node's [network]
[Match]
PermanentMACAddress=52:54:00:12:34:56
Type=ether
<BLANKLINE>
[Network]
Bridge=br0
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from .errors import die

IFNAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,14}")  # IFNAMSIZ: 15 characters
MAC_RE = re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}")
BOND_MODES = ("balance-rr", "active-backup", "balance-xor", "broadcast", "802.3ad",
              "balance-tlb", "balance-alb")
PRIMARY = "primary"
NETWORK_DIR = "etc/systemd/network"
HEADER = "# written by imgbase from the node's [network]\n"


class NetworkError(Exception):
    """A bad value: ``key`` is the TOML path of the value, for the caller's file:line."""

    def __init__(self, key: tuple[str, ...], message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.key, self.message, self.hint = key, message, hint


@dataclass(frozen=True)
class Route:
    to: str  # a network, "0.0.0.0/0" for a default
    via: str


@dataclass(frozen=True)
class L3:
    """What an interface that is no other's port carries: DHCP or static."""

    addresses: tuple[str, ...] = ()  # "192.0.2.10/24": none means DHCP
    gateway: str | None = None
    routes: tuple[Route, ...] = ()
    dns: tuple[str, ...] = ()
    mtu: int | None = None

    @property
    def dhcp(self) -> bool:
        return not self.addresses


@dataclass(frozen=True)
class Bridge:
    name: str
    ports: tuple[str, ...]
    l3: L3 = field(default_factory=L3)


@dataclass(frozen=True)
class Bond:
    name: str
    ports: tuple[str, ...]
    mode: str = "active-backup"
    l3: L3 = field(default_factory=L3)


@dataclass(frozen=True)
class Vlan:
    name: str
    id: int
    link: str
    l3: L3 = field(default_factory=L3)


@dataclass(frozen=True)
class Network:
    bridges: tuple[Bridge, ...] = ()
    bonds: tuple[Bond, ...] = ()
    vlans: tuple[Vlan, ...] = ()
    dns: tuple[str, ...] = ()

    @property
    def masters(self) -> tuple[Bridge | Bond, ...]:
        return (*self.bridges, *self.bonds)

    @property
    def virtual(self) -> dict[str, Bridge | Bond | Vlan]:
        devices: tuple[Bridge | Bond | Vlan, ...] = (*self.bridges, *self.bonds, *self.vlans)
        return {d.name: d for d in devices}

    def master_of(self, name: str) -> str | None:
        return next((d.name for d in self.masters if name in d.ports), None)

    @property
    def uses_primary(self) -> bool:
        return any(PRIMARY in d.ports for d in self.masters) or any(
            v.link == PRIMARY for v in self.vlans)


DEFAULT = Network(bridges=(Bridge("br0", (PRIMARY,)),))


# -- parsing and checking -------------------------------------------------------------

def _fail(key: tuple[str, ...], message: str, hint: str | None = None) -> NoReturn:
    raise NetworkError(key, message, hint)


def _keys(data: Any, key: tuple[str, ...], allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        _fail(key, f"[{'.'.join(key)}] must be a table")
    unknown = sorted(set(data) - allowed)
    if unknown:
        _fail((*key, unknown[0]), f"unknown key '{unknown[0]}' in [{'.'.join(key)}]",
              hint=f"known keys: {', '.join(sorted(allowed))}")
    checked: dict[str, Any] = data
    return checked


def _strings(data: dict[str, Any], name: str, key: tuple[str, ...]) -> tuple[str, ...]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail((*key, name), f"{'.'.join((*key, name))} must be a list of strings")
    return tuple(value)


#: what an address may hold: ipaddress takes an IPv6 scope ("fe80::1%eth0"), and a scope
#: holds anything, newlines included
ADDRESS_CHARS = re.compile(r"[0-9A-Fa-f:./]+")
#: every value written into a networkd file is one of these (a last guard after the checks)
VALUE_RE = re.compile(r"[0-9A-Za-z:./_-]+")


def _ip(text: str, key: tuple[str, ...], what: str) -> str:
    if not ADDRESS_CHARS.fullmatch(text):
        _fail(key, f"{what} {text!r} is not an IP address",
              hint="digits, hex, '.', ':' (no scope: a zone such as %eth0 is not taken)")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        _fail(key, f"{what} {text!r} is not an IP address", hint="e.g. 192.0.2.1 or 2001:db8::1")
    raise AssertionError


def _interface(text: str, key: tuple[str, ...]) -> str:
    """An address with its prefix, as a host on a network: 192.0.2.10/24."""
    if not ADDRESS_CHARS.fullmatch(text):
        _fail(key, f"address {text!r} is not an address with a valid prefix",
              hint="e.g. 192.0.2.10/24 (no scope: a zone such as %eth0 is not taken)")
    if "/" not in text:
        _fail(key, f"address {text!r} has no prefix length", hint="e.g. 192.0.2.10/24")
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        _fail(key, f"address {text!r} is not an address with a valid prefix",
              hint="e.g. 192.0.2.10/24 (IPv4 prefixes 0-32, IPv6 0-128)")
        raise
    if iface.ip == iface.network.network_address and iface.network.prefixlen < \
            iface.max_prefixlen - 1:
        _fail(key, f"address {text!r} is the network's own address, not a host's",
              hint=f"a host address in {iface.network}")
    return str(iface)


def _l3(data: dict[str, Any], key: tuple[str, ...]) -> L3:
    addresses = tuple(_interface(a, (*key, "addresses")) for a in _strings(data, "addresses", key))
    gateway = data.get("gateway")
    if gateway is not None:
        if not isinstance(gateway, str):
            _fail((*key, "gateway"), "gateway must be a string")
        gateway = _ip(gateway, (*key, "gateway"), "gateway")
        if not addresses:
            _fail((*key, "gateway"), f"[{'.'.join(key)}] has a gateway but no addresses "
                  "(DHCP gives the gateway)", hint="add addresses, or drop the gateway")
        if not any(ipaddress.ip_address(gateway) in ipaddress.ip_interface(a).network
                   for a in addresses):
            _fail((*key, "gateway"), f"gateway {gateway} is on none of the networks of "
                  f"{', '.join(addresses)}", hint="a gateway on one of the interface's networks")
    routes = []
    raw = data.get("routes", [])
    if not isinstance(raw, list):
        _fail((*key, "routes"), "routes must be a list of { to = ..., via = ... }")
    for r in raw:
        r = _keys(r, (*key, "routes"), {"to", "via"})
        to, via = r.get("to"), r.get("via")
        if not (isinstance(to, str) and isinstance(via, str)):
            _fail((*key, "routes"), "a route needs to = NETWORK and via = ADDRESS",
                  hint='routes = [{ to = "10.0.0.0/8", via = "192.0.2.254" }]')
        try:
            if not ADDRESS_CHARS.fullmatch(to):
                raise ValueError(to)
            net = str(ipaddress.ip_network(to))
        except ValueError:
            _fail((*key, "routes"), f"route to {to!r} is not a network",
                  hint="e.g. 10.0.0.0/8 (host bits zero)")
        routes.append(Route(net, _ip(via, (*key, "routes"), "route via")))
    mtu = data.get("mtu")
    if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int)
                            or not 576 <= mtu <= 9216):
        _fail((*key, "mtu"), f"mtu {mtu!r} is out of range", hint="576 to 9216, e.g. 9000")
    dns = tuple(_ip(d, (*key, "dns"), "DNS server") for d in _strings(data, "dns", key))
    return L3(addresses, gateway, tuple(routes), dns, mtu)


def _name(name: str, key: tuple[str, ...]) -> str:
    if not IFNAME_RE.fullmatch(name) or name == PRIMARY or name.startswith("mac:"):
        _fail(key, f"interface name {name!r} is not one networkd can give",
              hint="a letter, then up to 14 letters, digits, '_', '.', '-' (e.g. br0)")
    return name


def _port(port: str, key: tuple[str, ...]) -> str:
    if port == PRIMARY:
        return port
    if port.startswith("mac:"):
        mac = port[4:].lower()
        if not MAC_RE.fullmatch(mac):
            _fail(key, f"port {port!r} is not a MAC address", hint="mac:52:54:00:12:34:56")
        return f"mac:{mac}"
    return _name(port, key)


L3_KEYS = {"addresses", "gateway", "routes", "dns", "mtu"}


def parse(data: Any) -> Network:
    """The [network] table, checked; raises NetworkError (with the key's path)."""
    top = _keys(data, ("network",), {"bridges", "bonds", "vlans", "dns"})
    dns = tuple(_ip(d, ("network", "dns"), "DNS server") for d in _strings(top, "dns",
                                                                          ("network",)))
    bridges, bonds, vlans = [], [], []
    for kind in ("bridges", "bonds", "vlans"):
        table = top.get(kind, {})
        if not isinstance(table, dict):
            _fail(("network", kind), f"[network.{kind}] must be a table of interfaces",
                  hint=f"[network.{kind}.NAME]")
        for name, body in table.items():
            key = ("network", kind, name)
            _name(name, key)
            if kind == "bridges":
                d = _keys(body, key, {"ports"} | L3_KEYS)
                bridges.append(Bridge(name, tuple(_port(p, (*key, "ports"))
                                                  for p in _strings(d, "ports", key)),
                                      _l3(d, key)))
            elif kind == "bonds":
                d = _keys(body, key, {"ports", "mode"} | L3_KEYS)
                mode = d.get("mode", "active-backup")
                if mode not in BOND_MODES:
                    _fail((*key, "mode"), f"bond mode {mode!r} is not one of "
                          f"{', '.join(BOND_MODES)}")
                ports = tuple(_port(p, (*key, "ports")) for p in _strings(d, "ports", key))
                if not ports:
                    _fail((*key, "ports"), f"bond {name} has no ports", hint='ports = ["eno1"]')
                bonds.append(Bond(name, ports, mode, _l3(d, key)))
            else:
                d = _keys(body, key, {"id", "link"} | L3_KEYS)
                vid, link = d.get("id"), d.get("link")
                if isinstance(vid, bool) or not isinstance(vid, int) or not 1 <= vid <= 4094:
                    _fail((*key, "id"), f"VLAN id {vid!r} is out of range", hint="1 to 4094")
                if not isinstance(link, str) or not link:
                    _fail((*key, "link"), f"VLAN {name} needs link = the NIC or bond it is on")
                vlans.append(Vlan(name, vid, _port(link, (*key, "link")), _l3(d, key)))
    net = Network(tuple(bridges), tuple(bonds), tuple(vlans), dns)
    _consistent(net)
    return net


def _consistent(net: Network) -> None:
    """One name per interface, one master per port, links that exist, one address once."""
    seen: dict[str, str] = {}
    devices: tuple[tuple[str, tuple[Bridge | Bond | Vlan, ...]], ...] = (
        ("bridges", net.bridges), ("bonds", net.bonds), ("vlans", net.vlans))
    for kind, devs in devices:
        for d in devs:
            if d.name in seen:
                _fail(("network", kind, d.name), f"interface {d.name} is declared twice "
                      f"(also in [network.{seen[d.name]}])")
            seen[d.name] = kind
    masters: dict[str, str] = {}
    for d in net.masters:
        kind = "bridges" if isinstance(d, Bridge) else "bonds"
        for port in d.ports:
            if port in masters:
                _fail(("network", kind, d.name, "ports"), f"port {port} is in both "
                      f"{masters[port]} and {d.name}", hint="a port has one master")
            if port == d.name:
                _fail(("network", kind, d.name, "ports"), f"{d.name} is its own port")
            if port in seen and seen[port] == "bridges":
                _fail(("network", kind, d.name, "ports"), f"bridge {port} cannot be a "
                      "port", hint="bridge NICs, bonds or VLANs")
            masters[port] = d.name
    for v in net.vlans:
        if v.link in seen and seen[v.link] != "bonds":
            _fail(("network", "vlans", v.name, "link"), f"VLAN {v.name} is on {v.link}, a "
                  f"{seen[v.link][:-1]}", hint="a VLAN is on a NIC or a bond")
    ids = [(v.link, v.id) for v in net.vlans]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        _fail(("network", "vlans"), f"VLAN id {dup[1]} is declared twice on {dup[0]}")
    addresses: dict[str, str] = {}
    for name, d in net.virtual.items():
        if d.l3 != L3() and (master := net.master_of(name)):
            _fail(("network", "bonds" if isinstance(d, Bond) else "vlans", name),
                  f"{name} is a port of {master}: its addresses, gateway, routes, DNS and "
                  f"MTU go on {master}", hint=f"move them to [network.bridges.{master}] or "
                  f"[network.bonds.{master}]")
        for a in d.l3.addresses:
            ip = str(ipaddress.ip_interface(a).ip)
            if ip in addresses:
                _fail(("network",), f"address {ip} is on both {addresses[ip]} and {name}",
                      hint="each address once")
            addresses[ip] = name


# -- rendering ------------------------------------------------------------------------

def _unit(sections: list[tuple[str, list[tuple[str, str]]]]) -> str:
    bad = [v for _, pairs in sections for _, v in pairs if not VALUE_RE.fullmatch(v)]
    if bad:  # unreachable through parse(): a value its checks let through is a bug
        raise AssertionError(f"refusing to write {bad[0]!r} into a networkd file")
    out = [HEADER.rstrip("\n")]
    for title, pairs in sections:
        if out[-1] != HEADER.rstrip("\n"):
            out.append("")
        out.append(f"[{title}]")
        out += [f"{k}={v}" for k, v in pairs]
    return "\n".join(out) + "\n"


def _match(port: str, primary_mac: str | None) -> list[tuple[str, str]]:
    if port == PRIMARY:
        if primary_mac is None or not MAC_RE.fullmatch(primary_mac):
            die("the network names the primary NIC, and none was found",
                hint="name the NIC (ports = [\"eno1\"]) or mac:ADDRESS")
        return [("PermanentMACAddress", primary_mac), ("Type", "ether")]
    if port.startswith("mac:"):
        return [("PermanentMACAddress", port[4:]), ("Type", "ether")]
    return [("Name", port)]


def _l3_sections(d: Bridge | Bond | Vlan, net: Network, vlans: list[str]
                 ) -> list[tuple[str, list[tuple[str, str]]]]:
    network: list[tuple[str, str]] = [("DHCP", "yes")] if d.l3.dhcp else []
    network += [("Address", a) for a in d.l3.addresses]
    if d.l3.gateway:
        network.append(("Gateway", d.l3.gateway))
    network += [("DNS", s) for s in (d.l3.dns or net.dns)]
    network += [("VLAN", v) for v in vlans]
    sections = [("Match", [("Name", d.name)])]
    if d.l3.mtu:
        sections.append(("Link", [("MTUBytes", str(d.l3.mtu))]))
    sections.append(("Network", network or [("LinkLocalAddressing", "no")]))
    if d.l3.dhcp:
        # by MAC address, not networkd's DUID: DHCP reservations made for the NIC's MAC
        # (which the bridge takes) keep working
        sections.append(("DHCPv4", [("ClientIdentifier", "mac")]))
    sections += [("Route", [("Destination", r.to), ("Gateway", r.via)]) for r in d.l3.routes]
    return sections


def mtu_of(net: Network, name: str) -> int | None:
    """A device's MTU: its own, else its master's (a bridge's MTU is capped by its ports',
    so the ports take the bridge's)."""
    d = net.virtual.get(name)
    if d is not None and d.l3.mtu:
        return d.l3.mtu
    master = net.master_of(name)
    return mtu_of(net, master) if master else None


def _link(net: Network, name: str) -> list[tuple[str, list[tuple[str, str]]]]:
    mtu = mtu_of(net, name)
    return [("Link", [("MTUBytes", str(mtu))])] if mtu else []


def _file_name(port: str) -> str:
    return "primary" if port == PRIMARY else port.replace(":", "")


def render(net: Network, primary_mac: str | None = None) -> dict[str, str]:
    """File name -> text, for /etc/systemd/network/. ``10-`` and ``11-`` sort them before
    the image's catch-all DHCP file (``20-dhcp.network``, ``Name=en* eth*``): networkd
    takes the first .network that matches, and a VLAN named eno1.100 must get ours."""
    files: dict[str, str] = {}
    for b in net.bridges:
        # the bridge takes its first NIC's address, as the NIC had it: DHCP reservations
        # and switch port security go on working once the NIC is bridged
        first = b.ports[0] if b.ports else None
        mac = (primary_mac if first == PRIMARY else first[4:]
               if first and first.startswith("mac:") else None)
        files[f"10-imgbase-{b.name}.netdev"] = _unit([("NetDev", [
            ("Name", b.name), ("Kind", "bridge"),
            *([("MACAddress", mac)] if mac and MAC_RE.fullmatch(mac) else [])])])
    for bond in net.bonds:
        files[f"10-imgbase-{bond.name}.netdev"] = _unit([
            ("NetDev", [("Name", bond.name), ("Kind", "bond")]),
            ("Bond", [("Mode", bond.mode), *([("MIIMonitorSec", "100ms")])])])
    for v in net.vlans:
        files[f"10-imgbase-{v.name}.netdev"] = _unit([
            ("NetDev", [("Name", v.name), ("Kind", "vlan")]), ("VLAN", [("Id", str(v.id))])])
    virtual = net.virtual
    vlans_on: dict[str, list[str]] = {}
    for v in net.vlans:
        vlans_on.setdefault(v.link, []).append(v.name)
    # ports that are NICs (not a bond or VLAN of ours): matched, then enslaved
    for master in net.masters:
        kind = "Bridge" if isinstance(master, Bridge) else "Bond"
        for port in master.ports:
            if port in virtual:
                continue
            files[f"10-imgbase-port-{_file_name(port)}.network"] = _unit([
                ("Match", _match(port, primary_mac)), *_link(net, master.name),
                ("Network", [(kind, master.name), *[("VLAN", v) for v in vlans_on.get(port, [])]])])
    # NICs that only carry VLANs
    for link, names in vlans_on.items():
        if link not in virtual and net.master_of(link) is None:
            files[f"10-imgbase-port-{_file_name(link)}.network"] = _unit([
                ("Match", _match(link, primary_mac)),
                ("Network", [("LinkLocalAddressing", "no"), *[("VLAN", v) for v in names]])])
    for name, d in virtual.items():
        over = net.master_of(name)
        vlans = vlans_on.get(name, [])
        if over is not None:
            how = "Bridge" if any(b.name == over for b in net.bridges) else "Bond"
            files[f"11-imgbase-{name}.network"] = _unit([
                ("Match", [("Name", name)]), *_link(net, name),
                ("Network", [(how, over), *[("VLAN", v) for v in vlans]])])
        else:
            files[f"11-imgbase-{name}.network"] = _unit(_l3_sections(d, net, vlans))
    return files


def parse_or_die(data: Any, fail: Callable[[tuple[str, ...], str, str | None], None]
                 ) -> Network:
    """parse, with a NetworkError handed to ``fail(key, message, hint)`` (file:line)."""
    try:
        return parse(data)
    except NetworkError as exc:
        fail(exc.key, exc.message, exc.hint)
        raise
