"""The agent's configuration and its systemd readiness messages, on the host."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from imgbase.agent import config
from imgbase.agent.systemd import notify
from imgbase.errors import InputError

GOOD = """
[cluster]
endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
group = "rack1"
ca = "/etc/imgbase/agent/ca.pem"
cert = "/etc/imgbase/agent/node.pem"
key = "/etc/imgbase/agent/node-key.pem"
[agent]
ttl = 20
domains = "shutdown"
"""


def test_a_full_config_parses(tmp_path: Path) -> None:
    c = config.parse(GOOD, tmp_path / "agent.toml")
    assert c.endpoints == ("https://10.0.0.1:2379", "https://10.0.0.2:2379")
    assert (c.group, c.ttl, c.domains, c.cert) == ("rack1", 20, "shutdown",
                                                   "/etc/imgbase/agent/node.pem")


def test_the_kernel_command_line_wins(tmp_path: Path) -> None:
    c = config.parse(GOOD, tmp_path / "agent.toml",
                     "quiet imgbase.agent.endpoints=http://127.0.0.1:2379 imgbase.agent.group=g2")
    assert (c.endpoints, c.group) == (("http://127.0.0.1:2379",), "g2")
    only_cmdline = config.parse("", tmp_path / "agent.toml",
                                "imgbase.agent.endpoints=http://10.1.1.1:2379")
    assert only_cmdline.endpoints == ("http://10.1.1.1:2379",) and only_cmdline.group == "default"


@pytest.mark.parametrize("text, message", [
    ("[cluster]\nendpoints = []\n", "no [cluster] endpoints"),
    ('[cluster]\nendpoints = ["etcd:2379"]\n', "is not an http(s) URL"),
    ('[cluster]\nendpoints = ["http://a:1"]\ngroup = "a/b"\n', "is not a group name"),
    ('[cluster]\nendpoints = ["http://a:1"]\ncert = "/c"\n', "cert and key go together"),
    ('[cluster]\nendpoints = ["http://a:1"]\n[agent]\nttl = 1\n', "is not 5 to 3600 seconds"),
    ('[cluster]\nendpoints = ["http://a:1"]\n[agent]\ndomains = "kill"\n', "is not a policy"),
    ('[cluster]\nendpoints = ["http://a:1"]\n[agent]\ndomains = "migrate"\n',
     "needs a migrate_hook"),
    ('[cluster]\nendpoint = ["http://a:1"]\n', "has no setting 'endpoint'"),
    ('[clutser]\n', "unknown section [clutser]"),
    ('[cluster\n', "fix the TOML syntax"),
])
def test_bad_configs_are_refused_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InputError) as e:
        config.parse(text, tmp_path / "agent.toml")
    assert message in e.value.oneline()


def test_missing_config_and_no_cmdline_is_a_clear_error(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=/dev/x quiet\n")
    with pytest.raises(InputError, match="is missing and the kernel command line names no"):
        config.load(tmp_path / "agent.toml", cmdline)


def test_render_writes_what_parse_reads(tmp_path: Path) -> None:
    text = config.render(["https://e1:2379"], "rack2", ca="/etc/imgbase/agent/ca.pem")
    c = config.parse(text, tmp_path / "agent.toml")
    assert (c.endpoints, c.group, c.ca) == (("https://e1:2379",), "rack2",
                                            "/etc/imgbase/agent/ca.pem")
    with pytest.raises(InputError):
        config.render(["not a url"])


def test_node_id_is_stable_and_not_the_machine_id(tmp_path: Path) -> None:
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    assert config.node_id(mid) == config.node_id(mid) != "0123456789abcdef0123456789abcdef"
    mid.write_text("")
    with pytest.raises(InputError, match="holds no machine id"):
        config.node_id(mid)


def test_notify_sends_a_datagram_to_notify_socket(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify("READY=1\nSTATUS=registered") is True
        assert server.recv(4096) == b"READY=1\nSTATUS=registered"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify("READY=1") is False


def test_the_daemon_without_config_is_not_a_failure_and_a_bad_one_is_78(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from imgbase.agent import main

    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=/dev/x\n")
    monkeypatch.setattr(config, "CONFIG", tmp_path / "agent.toml")
    monkeypatch.setattr(config, "CMDLINE", cmdline)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert main.main(["run"]) == 0
    (tmp_path / "agent.toml").write_text('[cluster]\nendpoints = ["etcd:2379"]\n')
    assert main.main(["run"]) == main.EX_CONFIG
    assert "endpoint 'etcd:2379' is not an http(s) URL" in caplog.text
