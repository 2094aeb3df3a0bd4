"""The agent's configuration and its systemd readiness messages, on the host."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import pytest

from imgbase.errors import InputError
from imgbase.node import agentconfig as config
from imgbase.node.systemd import notify

GOOD = """
[cluster]
endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
group = "rack1"
ca = "/etc/imgbase/agent/ca.pem"
cert = "/etc/imgbase/agent/node.pem"
key = "/etc/imgbase/agent/node-key.pem"
user = "node7"
password_file = "/etc/imgbase/agent/etcd-password"
[agent]
ttl = 20
domains = "shutdown"
"""


def test_a_full_config_parses(tmp_path: Path) -> None:
    c = config.parse(GOOD, tmp_path / "agent.toml")
    assert c.endpoints == ("https://10.0.0.1:2379", "https://10.0.0.2:2379")
    assert (c.group, c.ttl, c.domains, c.cert) == ("rack1", 20, "shutdown",
                                                   "/etc/imgbase/agent/node.pem")


def test_the_kernel_command_line_names_https_endpoints_and_the_group(tmp_path: Path) -> None:
    c = config.parse(GOOD, tmp_path / "agent.toml",
                     "quiet imgbase.agent.endpoints=https://10.9.0.1:2379 imgbase.agent.group=g2")
    assert (c.endpoints, c.group, c.user) == (("https://10.9.0.1:2379",), "g2", "node7")
    lab = config.parse("[cluster]\ninsecure_http = true\n", tmp_path / "agent.toml",
                       "imgbase.agent.endpoints=https://10.1.1.1:2379")
    assert lab.endpoints == ("https://10.1.1.1:2379",) and lab.group == "default"


@pytest.mark.parametrize("file", [GOOD, '[cluster]\nendpoints = ["http://a:1"]\n'
                                  "insecure_http = true\n", ""])
def test_the_kernel_command_line_cannot_downgrade_to_http(tmp_path: Path, file: str) -> None:
    with pytest.raises(InputError, match="the kernel command line: endpoint .* is plain http"):
        config.parse(file, tmp_path / "agent.toml",
                     "quiet imgbase.agent.endpoints=http://10.6.6.6:2379")
    with pytest.raises(InputError, match="is not a name"):  # nor name a group that is not
        config.parse(GOOD, tmp_path / "agent.toml", "imgbase.agent.group=a/b")


LAB = '[cluster]\ninsecure_http = true\nendpoints = ["http://a:1"]\n'


@pytest.mark.parametrize("text, message", [
    ("[cluster]\nendpoints = []\n", "no [cluster] endpoints"),
    ('[cluster]\nendpoints = ["etcd:2379"]\n', "is not an http(s) URL of an etcd member"),
    ('[cluster]\nendpoints = ["http://a:1"]\n', "is plain http"),
    ('[cluster]\nendpoints = ["https://a:1"]\nuser = "n"\n', "user and password_file go"),
    ('[cluster]\nendpoints = ["https://a:1/v3?x"]\n', "is not an http(s) URL of an etcd member"),
    ('[cluster]\ninsecure_http = "yes"\nendpoints = ["http://a:1"]\n',
     "agent.toml:2: 'insecure_http' must be bool, not str"),
    (LAB + 'group = "a/b"\n',
     "is not a name"),
    (LAB + 'cert = "c.pem"\n'
     'key = "/k"\n', "is not an absolute path"),
    (LAB + 'cert = "/c"\n', "cert and key go together"),
    ('[cluster]\nendpoints = ["https://a:1"]\nuser = "root"\npassword_file = "/p"\n',
     "user root is the cluster admin's"),
    (LAB + '[agent]\nttl = 1\n', "is not 5 to 3600 seconds"),
    (LAB + '[agent]\ndomains = "kill"\n', "is not a policy"),
    (LAB + '[agent]\ndomains = "migrate"\n',
     "needs a migrate_hook"),
    ('[cluster]\nendpoint = ["https://a:1"]\n',
     "agent.toml:2: unknown key 'endpoint' in [cluster]"),
    ('\n[clutser]\n', "agent.toml:2: unknown section [clutser]"),
    ('[cluster\n', "agent.toml:1: TOML syntax error"),
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
    text = config.Join(("https://e1:2379",), "rack2", ca="/etc/imgbase/agent/ca.pem",
                       user="n1", password_file="/etc/imgbase/agent/etcd-password"
                       ).agent_toml()
    c = config.parse(text, tmp_path / "agent.toml")
    assert (c.endpoints, c.group, c.ca, c.user) == (("https://e1:2379",), "rack2",
                                                    "/etc/imgbase/agent/ca.pem", "n1")
    with pytest.raises(InputError):
        config.Join(("not a url",)).agent_toml()


INJECTIONS = ['g"\nmigrate_hook = "/tmp/x"\ndomains = "migrate', "g'\n[agent]\nttl=5",
              'g\\"', "g\u2028x", "g\x00", "", "g" * 64]


@pytest.mark.parametrize("group", INJECTIONS)
def test_a_group_cannot_inject_settings(tmp_path: Path, group: str) -> None:
    """Finding 8: a group with a quote and a newline set migrate_hook (run as root)."""
    with pytest.raises(InputError, match="group .* is not a name"):
        config.Join(("https://e1:2379",), group, user="n1",
                    password_file="/etc/imgbase/agent/etcd-password").agent_toml()


@pytest.mark.parametrize("value", ['/etc/x"\nmigrate_hook = "/tmp/evil', "/a\\b\u007f\tc"])
def test_every_string_is_escaped_and_reads_back(tmp_path: Path, value: str) -> None:
    """The writer escapes what it writes: a path with a quote and a newline is refused by
    the path check, and a strange but absolute one reads back as itself, nothing more."""
    if "\n" in value:
        with pytest.raises(InputError, match="is not an absolute path"):
            config.Join(("https://e1:2379",), "g", ca=value, user="n",
                        password_file="/p").agent_toml()
        return
    text = config.Join(("https://e1:2379",), "g", ca=value, user="n",
                       password_file="/p").agent_toml()
    assert config.parse(text, tmp_path / "agent.toml").ca == value
    assert "migrate_hook" not in tomllib.loads(text).get("agent", {})


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
    assert "endpoint 'etcd:2379' is not an http(s) URL of an etcd member" in caplog.text
    # a cert path that is not there: one line and 78, not a traceback (and a restart loop)
    (tmp_path / "agent.toml").write_text(GOOD)
    caplog.clear()
    assert main.main(["run"]) == main.EX_CONFIG
    assert "ca = /etc/imgbase/agent/ca.pem does not exist" in caplog.text
    assert "Traceback" not in caplog.text


def test_the_agent_refuses_an_https_cluster_without_its_etcd_user(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("")
    (tmp_path / "agent.toml").write_text('[cluster]\nendpoints = ["https://a:1"]\n')
    with pytest.raises(InputError, match="has no user: the cluster's etcd has auth on"):
        config.load(tmp_path / "agent.toml", cmdline)


def test_the_unit_does_not_restart_on_a_config_error() -> None:
    from imgbase.agent import main

    unit = (Path(__file__).parents[2] / "boot/systemd/imgbase-agent.service").read_text()
    assert f"RestartPreventExitStatus={main.EX_CONFIG}" in unit.splitlines()
