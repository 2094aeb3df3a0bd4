"""The node's [network]: every bad value refused with file:line, nothing else reaches the
networkd files, and the files say what the TOML said."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from imgbase import config, netconf
from imgbase.errors import InputError
from imgbase.node.install import check_network, libvirt_bridge_network, network_steps

MAC = "52:54:00:12:34:56"
FULL = """\
[network]
dns = ["192.0.2.53"]
[network.bridges.br0]
ports = ["bond0"]
addresses = ["192.0.2.10/24", "2001:db8::10/64"]
gateway = "192.0.2.1"
routes = [{ to = "10.0.0.0/8", via = "192.0.2.254" }]
mtu = 9000
[network.bonds.bond0]
mode = "802.3ad"
ports = ["eno1", "mac:52:54:00:AA:BB:CC"]
[network.vlans.vlan100]
id = 100
link = "bond0"
[network.bridges.br100]
ports = ["vlan100"]
"""


def load(tmp_path: Path, text: str) -> netconf.Network:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return config.load_network(path)


def ini(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(text)
    return cp


def test_full_network_renders_what_it_says(tmp_path: Path) -> None:
    net = load(tmp_path, FULL)
    files = netconf.render(net)
    assert ini(files["10-imgbase-bond0.netdev"])["Bond"]["Mode"] == "802.3ad"
    assert ini(files["10-imgbase-vlan100.netdev"])["VLAN"]["Id"] == "100"
    eno1 = ini(files["10-imgbase-port-eno1.network"])
    assert eno1["Match"]["Name"] == "eno1" and eno1["Network"]["Bond"] == "bond0"
    mac = ini(files["10-imgbase-port-mac525400aabbcc.network"])
    assert mac["Match"]["PermanentMACAddress"] == "52:54:00:aa:bb:cc"
    bond = files["11-imgbase-bond0.network"]
    assert "Bridge=br0" in bond and "VLAN=vlan100" in bond
    br0 = files["11-imgbase-br0.network"]
    assert "Address=192.0.2.10/24\nAddress=2001:db8::10/64\nGateway=192.0.2.1\n" in br0
    assert "DNS=192.0.2.53" in br0 and "DHCP" not in br0 and "MTUBytes=9000" in br0
    assert "[Route]\nDestination=10.0.0.0/8\nGateway=192.0.2.254" in br0
    assert "Bridge=br100" in files["11-imgbase-vlan100.network"]
    # the bridge's MTU on everything under it: the bond and its NICs
    for name in ("11-imgbase-bond0.network", "10-imgbase-port-eno1.network"):
        assert ini(files[name])["Link"]["MTUBytes"] == "9000", name
    assert ini(files["11-imgbase-br100.network"])["DHCPv4"]["ClientIdentifier"] == "mac"
    assert "DHCP=yes" in files["11-imgbase-br100.network"]


def test_default_is_br0_over_the_primary_nic_by_dhcp(tmp_path: Path) -> None:
    assert load(tmp_path, "# nothing\n") == netconf.DEFAULT
    files = netconf.render(netconf.DEFAULT, MAC)
    assert ini(files["10-imgbase-port-primary.network"])["Match"]["PermanentMACAddress"] == MAC
    assert ini(files["11-imgbase-br0.network"])["Network"]["DHCP"] == "yes"
    assert ini(files["10-imgbase-br0.netdev"])["NetDev"]["MACAddress"] == MAC  # the NIC's
    # sorted before the image's catch-all DHCP file: networkd takes the first match
    assert all(name < "20-dhcp.network" for name in files if name.endswith(".network")
               and "port" in name)
    steps = {s.name: s for s in network_steps(netconf.DEFAULT, MAC, Path("/r"))}
    assert steps["libvirt-network"].write == (
        "/r/etc/libvirt/qemu/networks/default.xml", libvirt_bridge_network("br0"))
    assert steps["libvirt-network-autostart"].argv[-1] == \
        "/r/etc/libvirt/qemu/networks/autostart/default.xml"


@pytest.mark.parametrize("text, where, message", [
    ('[network.bridges.br0]\nports = ["eno1"]\nstp = true\n', 3, "unknown key 'stp'"),
    ('[network.bridges."br0;x"]\nports = ["eno1"]\n', 1, "interface name 'br0;x' is not"),
    ('[network.bridges.br0]\nports = ["eno1"]\naddresses = ["192.0.2.10"]\n', 3,
     "has no prefix length"),
    ('[network.bridges.br0]\nports = ["eno1"]\naddresses = ["192.0.2.10/33"]\n', 3,
     "not an address with a valid prefix"),
    ('[network.bridges.br0]\nports = ["eno1"]\naddresses = ["192.0.2.0/24"]\n', 3,
     "the network's own address"),
    ('[network.bridges.br0]\nports = ["eno1"]\ngateway = "192.0.2.1"\n', 3,
     "has a gateway but no addresses"),
    ('[network.bridges.br0]\nports = ["eno1"]\naddresses = ["192.0.2.10/24"]\n'
     'gateway = "198.51.100.1"\n', 4, "gateway 198.51.100.1 is on none of the networks"),
    ('[network.vlans.v]\nid = 4095\nlink = "eno1"\n', 2, "VLAN id 4095 is out of range"),
    ('[network.vlans.v]\nid = 0\nlink = "eno1"\n', 2, "VLAN id 0 is out of range"),
    ('[network.bonds.b]\nports = ["eno1"]\nmode = "fast"\n', 3, "bond mode 'fast'"),
    ('[network.bridges.br0]\nports = ["eno1"]\n[network.bridges.br1]\nports = ["eno1"]\n', 4,
     "port eno1 is in both br0 and br1"),
    ('[network.bridges.br0]\nports = ["eno1"]\naddresses = ["192.0.2.10/24"]\n'
     '[network.bridges.br1]\nports = ["eno2"]\naddresses = ["192.0.2.10/25"]\n', 1,
     "address 192.0.2.10 is on both br0 and br1"),
    ('[network.bridges.br0]\nports = ["mac:zz"]\n', 2, "is not a MAC address"),
    ('[network]\ndns = ["8.8.8.8; rm"]\n', 2, "is not an IP address"),
    # ipaddress takes an IPv6 zone, and a zone holds anything, newlines included
    ('[network]\ndns = ["fe80::1%x\\n[Route]\\nGateway=6.6.6.6"]\n', 2, "is not an IP address"),
    ('[network.bridges.br0]\nports = ["eno1"]\naddresses = ["fe80::1%x\\nDNS=1.1.1.1/64"]\n',
     3, "not an address with a valid prefix"),
    ('[network.bridges.br0]\nports = ["b"]\n[network.bonds.b]\nports = ["eno1"]\nmtu = 9000\n',
     3, "b is a port of br0: its addresses, gateway, routes, DNS and MTU go on br0"),
    ('[network.bridges.br0]\nports = ["eno1"]\nmtu = 100000\n', 3, "mtu 100000 is out of range"),
])
def test_bad_network_names_file_and_line(tmp_path: Path, text: str, where: int,
                                         message: str) -> None:
    with pytest.raises(InputError) as exc:
        load(tmp_path, text)
    assert f"node.toml:{where}: " in exc.value.oneline() and message in exc.value.oneline()


def test_imgbase_toml_takes_the_network_section(tmp_path: Path) -> None:
    path = tmp_path / "imgbase.toml"
    path.write_text(FULL)
    assert config.load(path).network == load(tmp_path, FULL)
    assert config.load(tmp_path / "none.toml").network is None


def test_a_bridge_over_a_missing_nic_is_refused() -> None:
    net = netconf.parse({"bridges": {"br0": {"ports": ["eno9"]}}})
    with pytest.raises(InputError, match="names NIC eno9, and this machine has no such NIC"):
        check_network(net, {"ens3": MAC})
    assert check_network(net, {"eno9": MAC}) is None  # no primary NIC used
    twice = netconf.parse({"bridges": {"br0": {"ports": ["eno9"]},
                                       "br1": {"ports": [f"mac:{MAC}"]}}})
    with pytest.raises(InputError, match="names one NIC twice: eno9 and mac:52:54"):
        check_network(twice, {"eno9": MAC})
    with pytest.raises(InputError, match="no such NIC"):
        check_network(netconf.parse({"bridges": {"br0": {"ports": ["mac:52:54:00:00:00:01"]}}}),
                      {"ens3": MAC})
