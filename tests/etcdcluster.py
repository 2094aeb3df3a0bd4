"""Real etcd servers on 127.0.0.1 for tests: one member or a cluster, optionally TLS.

    with etcd_cluster(tmp_path, size=3) as cluster:
        client = cluster.client()
        cluster.kill_member(0)
        ...
        cluster.restart_member(0)

Each member is an ``/usr/bin/etcd`` child with free loopback ports, its data dir and its
log under the given directory, killed (SIGKILL, by pid) at the end -- and by the kernel
should pytest itself be killed (PR_SET_PDEATHSIG). A member counts as
started when its ``/health`` says true, which needs a leader: the members of a cluster
are started together and then waited for. The timing flags are etcd's defaults (100 ms
heartbeat, 1 s election timeout), which also makes etcd's minimum lease TTL 2 s.

TLS (``tls=True``): a throw-away CA signs a server certificate for 127.0.0.1 and
localhost (also usable as a client certificate: etcd's own JSON gateway dials the member
with it) and a client certificate; ``client_cert_auth=True`` makes the members require
one. The peers talk plain HTTP on loopback.

Without /usr/bin/etcd the tests skip; CI installs the Debian package etcd-server.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from imgbase.agent import fleet
from imgbase.agent.etcd import Etcd

ETCD = Path("/usr/bin/etcd")
START_TIMEOUT = 30.0  # seconds for a member to say it is healthy
PORT_TRIES = 3  # a free port may be taken between finding it and etcd binding it


def require_etcd() -> None:
    if not ETCD.exists():
        pytest.skip(f"{ETCD} is missing: apt-get install etcd-server (CI installs it)")


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the child: be SIGKILLed if pytest dies without its teardown (Linux prctl)."""
    with suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed: {proc.stderr}")


def make_certs(directory: Path) -> TLSFiles:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost, a client one."""
    directory.mkdir(parents=True, exist_ok=True)
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=imgbase test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    leaves = {
        # 10.0.2.100: the host's 127.0.0.1 as qemu guests reach it (imgbase.vm.GUESTFWD_ADDR)
        "server": ("/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1,IP:10.0.2.100,DNS:localhost\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"),
        # no CN: etcd 3.4's JSON gateway refuses a client certificate with one when auth
        # is on (see make_client_cert)
        "client": ("/O=imgbase/OU=imgbase-agent", "extendedKeyUsage=clientAuth\n"),
    }
    for name, (subject, ext) in leaves.items():
        (directory / f"{name}.ext").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n" + ext
        )
        _openssl("req", "-new", *curve, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subject, cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                 "-out", f"{name}.crt", cwd=directory)
    return TLSFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                    directory / "client.crt", directory / "client.key")


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    scheme: str = "http"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class EtcdCluster:
    """Members of one etcd cluster on 127.0.0.1, started by :func:`etcd_cluster`."""

    directory: Path
    members: list[Member]
    tls: TLSFiles | None = None
    client_cert_auth: bool = False
    token: str = "imgbase-test"
    _http: requests.Session = field(default_factory=requests.Session)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def client(self, endpoints: list[str] | None = None, *, cert: bool = True,
               timeout: float = 5.0) -> Etcd:
        """An Etcd client for these members (with the client certificate unless cert=False)."""
        tls = self.tls
        return Etcd(
            endpoints or self.endpoints,
            ca=tls.ca if tls else None,
            cert=tls.client_cert if tls and cert else None,
            key=tls.client_key if tls and cert else None,
            timeout=timeout,
        )

    # -- processes --

    def _argv(self, m: Member) -> list[str]:
        initial = ",".join(f"{o.name}={o.peer_url}" for o in self.members)
        argv = [
            str(ETCD), "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ]
        if self.tls:
            argv += ["--cert-file", str(self.tls.server_cert),
                     "--key-file", str(self.tls.server_key),
                     "--trusted-ca-file", str(self.tls.ca)]
            if self.client_cert_auth:
                argv.append("--client-cert-auth")
        return argv

    def _spawn(self, m: Member) -> None:
        with open(m.log, "ab") as log:
            m.proc = subprocess.Popen(self._argv(m), stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    def _healthy(self, m: Member) -> bool:
        tls = self.tls
        try:
            resp = self._http.get(
                m.client_url + "/health", timeout=2,
                verify=str(tls.ca) if tls else True,
                cert=(str(tls.client_cert), str(tls.client_key)) if tls else None,
            )
        except requests.RequestException:
            return False
        return resp.status_code == 200 and resp.json().get("health") == "true"

    def wait_healthy(self, indexes: list[int] | None = None,
                     timeout: float = START_TIMEOUT) -> None:
        """Wait until the members (default: all that run) answer /health with true."""
        todo = [self.members[i] for i in indexes] if indexes is not None else [
            m for m in self.members if m.proc is not None]
        deadline = time.monotonic() + timeout
        while todo:
            for m in list(todo):
                assert m.proc is not None
                if m.proc.poll() is not None:
                    raise MemberDied(m)
                if self._healthy(m):
                    todo.remove(m)
            if todo and time.monotonic() > deadline:
                tails = "\n".join(f"--- {m.name}:\n{m.log_tail()}" for m in todo)
                raise TimeoutError(f"etcd members not healthy after {timeout} s:\n{tails}")
            if todo:
                time.sleep(0.05)

    def kill_member(self, i: int) -> None:
        """SIGKILL member i (a crash: no goodbye to the peers) and reap it."""
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait()
        m.proc = None

    def restart_member(self, i: int, wait: bool = True) -> None:
        """Start member i again on its data dir and ports (and wait until it is healthy)."""
        self.kill_member(i)
        self._spawn(self.members[i])
        if wait:
            self.wait_healthy([i])

    def leader_index(self, timeout: float = 10.0) -> int:
        """The index of the leader, once every running member names the same one."""
        deadline = time.monotonic() + timeout
        running = {i: m.client_url for i, m in enumerate(self.members) if m.proc is not None}
        while True:
            with self.client() as c:
                try:
                    statuses = {i: c.status(url) for i, url in running.items()}
                except Exception:  # a member still starting, or no leader yet
                    statuses = {}
            leaders = {s.leader for s in statuses.values()}
            found = [i for i, s in statuses.items() if s.is_leader]
            if len(leaders) == 1 and len(found) == 1:
                return found[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no etcd leader among the running members in {timeout} s")
            time.sleep(0.1)

    def stop(self) -> None:
        for i in range(len(self.members)):
            self.kill_member(i)
        self._http.close()


class MemberDied(RuntimeError):
    def __init__(self, m: Member) -> None:
        assert m.proc is not None
        super().__init__(f"etcd member {m.name} exited with {m.proc.returncode}:\n"
                         f"{m.log_tail()}")
        self.address_in_use = "address already in use" in m.log_tail(50)


@contextmanager
def etcd_cluster(directory: Path, size: int = 1, *, tls: bool = False,
                 client_cert_auth: bool = False) -> Iterator[EtcdCluster]:
    """Start ``size`` etcd members on 127.0.0.1 under ``directory``; kill them at the end."""
    require_etcd()
    if client_cert_auth and not tls:
        raise ValueError("client_cert_auth needs tls=True")
    directory.mkdir(parents=True, exist_ok=True)
    files = make_certs(directory / "pki") if tls else None
    for attempt in range(PORT_TRIES):
        run_dir = directory / f"run{attempt}"
        ports = free_ports(2 * size)
        members = [
            Member(f"m{i}", ports[2 * i], ports[2 * i + 1], run_dir / f"m{i}.etcd",
                   run_dir / f"m{i}.log", "https" if tls else "http")
            for i in range(size)
        ]
        run_dir.mkdir()
        cluster = EtcdCluster(run_dir, members, files, client_cert_auth,
                              token=f"imgbase-test-{os.getpid()}-{ports[0]}")
        try:
            for m in members:
                cluster._spawn(m)
            cluster.wait_healthy()
        except MemberDied as died:
            cluster.stop()
            if died.address_in_use and attempt + 1 < PORT_TRIES:
                shutil.rmtree(run_dir, ignore_errors=True)
                continue
            raise
        except BaseException:
            cluster.stop()
            raise
        try:
            yield cluster
        finally:
            cluster.stop()
        return


def max_holders_in_history(etcd: Etcd, g: str, since: int) -> int:
    """The most nodes that held one of group g's reboot slots at once since revision
    `since`, replayed from etcd's history of the group's slot queue and its max (holders:
    the max oldest keys of the queue, by create revision)."""
    prefix, max_key = fleet.group_key(g, "slots/"), fleet.group_key(g, "max")
    before = etcd.get_prefix(fleet.group_key(g, ""), revision=since - 1) if since > 1 else []
    queue = {e.key: e.create_revision for e in before if e.key.startswith(prefix)}
    k = fleet.parse_max(next((e.value for e in before if e.key == max_key), None))
    most = min(len(queue), k)
    for change in etcd.changes(fleet.group_key(g, ""), since):
        if change.key == max_key:
            k = fleet.parse_max(change.value)
        elif change.key.startswith(prefix):
            if change.value is None:
                queue.pop(change.key, None)
            else:
                queue.setdefault(change.key, change.revision)
        most = max(most, min(len(queue), k))
    return most


def make_client_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A client certificate signed by the test CA that names ``name`` without a CN:
    etcd 3.4's JSON gateway refuses every client certificate with a CN once auth is on
    ("CommonName of client sending a request against gateway will be ignored")."""
    ext = directory / f"{name}.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=clientAuth\n")
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-new", *curve, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/O=imgbase/OU={name}", cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", f"{name}.crt",
             cwd=directory)
    return directory / f"{name}.crt", directory / f"{name}.key"


@dataclass
class AuthCluster:
    """An etcd with TLS, client certificates required and auth on (:func:`auth_cluster`):
    the admin is root, each node an etcd user made by fleet.add_node."""

    cluster: EtcdCluster
    root_password: str
    passwords: dict[str, str] = field(default_factory=dict)

    def _client(self, name: str, password: str, timeout: float = 5.0) -> Etcd:
        tls = self.cluster.tls
        assert tls is not None
        cert, key = make_client_cert(tls.ca.parent, name)
        return Etcd(self.cluster.endpoints, ca=tls.ca, cert=cert, key=key, user=name,
                    password=password, timeout=timeout)

    def admin(self) -> Etcd:
        return self._client("root", self.root_password)

    def add_node(self, node: str, group: str) -> str:
        """The node's etcd user and role (by the admin); its password."""
        password = f"pw-{node}-{os.getpid()}"
        with self.admin() as admin:
            fleet.add_node(admin, node, group, password)
        self.passwords[node] = password
        return password

    def node(self, node: str, password: str | None = None) -> Etcd:
        return self._client(node, password or self.passwords[node])


@contextmanager
def auth_cluster(directory: Path) -> Iterator[AuthCluster]:
    """One etcd member with TLS, --client-cert-auth, and auth enabled by fleet.init_auth."""
    with etcd_cluster(directory, tls=True, client_cert_auth=True) as cluster:
        assert cluster.tls is not None
        root_password = f"root-{os.getpid()}"
        cert, key = make_client_cert(cluster.tls.ca.parent, "root")
        with Etcd(cluster.endpoints, ca=cluster.tls.ca, cert=cert, key=key) as bootstrap:
            fleet.init_auth(bootstrap, root_password)
        yield AuthCluster(cluster, root_password)
