"""Contract tests of the osbuild-composer backend: a fake Weldr API, not an integration test.

osbuild-composer is not available on Debian, so these tests serve a protocol fake of its
Weldr API (http.server over a unix socket, in a thread) with the routes, request checks
and reply shapes of osbuild-composer's internal/weldr/api.go: ``{"status": true}``,
``{"status": false, "errors": [{"id", "msg"}]}``, ``{"build_id", "status", "warnings"}``,
``{"uuids": [{"id", "queue_status", ...}]}``, and the 404 ``HTTPError`` it answers a
compose request body it cannot decode with. Blueprints are parsed with tomllib and
checked as osbuild-composer does (name, semantic version, known distribution). The
image it serves is a root.tar.xz made here with GNU tar, owners, setuid bits, a file
capability and a real rpm database included.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import socketserver
import stat
import subprocess
import threading
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imgbase.compose.backend import ComposerBackend
from imgbase.compose.osbuild import (
    API,
    Blueprint,
    OsbuildBackend,
    WeldrClient,
    WeldrConfig,
)
from imgbase.errors import ImgbaseError, InputError
from imgbase.image.spec import ImageSpec, LayerSpec, Services
from tests.compose.test_lorax_contract import (
    CAP_NET_RAW,
    HELLO,
    context,
    install_rpm,
    tiny_rpm,
)

pytestmark = pytest.mark.contract
__all__ = ["tiny_rpm"]  # a fixture, shared with the lorax contract tests

EPOCH = 1767225600
DISTROS = ("centos-9", "fedora-40", "fedora-41", "rhel-9.4")
IMAGE_TYPES = ("ami", "image-installer", "qcow2", "tar", "vhd")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# -- the fake osbuild-composer -------------------------------------------------------

@dataclass
class Compose:
    blueprint: dict[str, Any]
    compose_type: str
    states: list[str]  # queue_status of successive status requests; the last one stays
    polls: int = 0

    @property
    def state(self) -> str:
        return self.states[min(self.polls, len(self.states) - 1)]


@dataclass
class FakeWeldr:
    """State and knobs of the fake; ``requests`` records (method, path, headers, body)."""

    image: bytes = b""
    states: list[str] = field(default_factory=lambda: ["WAITING", "RUNNING", "FINISHED"])
    log_text: str = ""
    blueprints: dict[str, dict[str, Any]] = field(default_factory=dict)
    composes: dict[str, Compose] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        return [f"{method} {path}" for method, path, _, _ in self.requests]


def _error(code: int, ident: str, msg: str) -> tuple[int, dict[str, Any]]:
    error: dict[str, Any] = {"id": ident, "msg": msg}
    if ident == "HTTPError":
        error["code"] = code
    return code, {"status": False, "errors": [error]}


NOT_FOUND = _error(404, "HTTPError", "Not Found")


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base's name)
        pass  # AF_UNIX has no client address to log

    def do_GET(self) -> None:  # noqa: N802
        self.dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self.dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self.dispatch("DELETE")

    def dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fake = self.server.fake
        with fake.lock:
            fake.requests.append((method, self.path, dict(self.headers), body))
            answer = self.route(fake, method, self.path, body)
        if isinstance(answer, bytes):
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Disposition", "attachment; filename=x-root.tar.xz")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
            return
        code, reply = answer
        data = reply.encode() if isinstance(reply, str) else (json.dumps(reply) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def route(self, fake: FakeWeldr, method: str, path: str,
              body: bytes) -> bytes | tuple[int, Any]:
        if method == "POST" and path == f"{API}/blueprints/new":
            return self.blueprints_new(fake, body)
        if method == "POST" and path == f"{API}/compose":
            return self.compose(fake, body)
        m = re.fullmatch(rf"{API}/compose/(status|log|image|delete|cancel)/([^/?]+)", path)
        if not m:
            return NOT_FOUND
        verb, ident = m[1], m[2]
        wanted = "DELETE" if verb in ("delete", "cancel") else "GET"
        if method != wanted:
            return 405, ""
        if not _UUID.match(ident):
            return _error(400, "UnknownUUID", f"{ident} is not a valid build uuid")
        compose = fake.composes.get(ident)
        if verb == "status":
            if compose is None:
                return 200, {"uuids": []}
            state = compose.state
            compose.polls += 1
            return 200, {"uuids": [{
                "id": ident, "blueprint": compose.blueprint["name"],
                "version": compose.blueprint["version"], "compose_type": compose.compose_type,
                "image_size": 0, "queue_status": state, "job_created": 1.0}]}
        if compose is None:
            return _error(400, "UnknownUUID", f"Compose {ident} doesn't exist")
        if verb == "log":
            if compose.state == "RUNNING":
                return 200, f"Build {ident} is still running.\n"
            return 200, fake.log_text
        if verb == "image":
            if compose.state != "FINISHED":
                return _error(400, "BuildInWrongState",
                              f"Build {ident} is in wrong state: {compose.state}")
            return fake.image
        if verb == "cancel":
            compose.states = ["FAILED"]
            return 200, {"uuid": ident, "status": True}
        del fake.composes[ident]
        return 200, {"uuids": [{"uuid": ident, "status": True}], "errors": []}

    def blueprints_new(self, fake: FakeWeldr, body: bytes) -> tuple[int, Any]:
        kind = self.headers.get("Content-Type")
        if not kind:
            return _error(400, "BlueprintsError", "missing Content-Type header")
        if not body:
            return _error(400, "BlueprintsError", "Missing blueprint")
        try:
            if kind == "text/x-toml":
                bp = tomllib.loads(body.decode())
            elif kind == "application/json":
                bp = json.loads(body)
            else:
                raise ValueError("blueprint must be in json or toml format")
        except ValueError as exc:
            return _error(400, "BlueprintsError", "400 Bad Request: The browser (or proxy) "
                          f"sent a request that this server could not understand: {exc}")
        if not re.fullmatch(r"[a-zA-Z0-9._-]+", bp.get("name", "")):
            return _error(400, "InvalidChars", "Invalid characters in API path")
        distro = bp.get("distro", "")
        if distro and distro not in DISTROS:
            return _error(400, "BlueprintsError", f"'{distro}' is not a valid distribution "
                          f"(architecture '{bp.get('arch', 'x86_64')}')")
        if not re.fullmatch(r"\d+\.\d+\.\d+", bp.get("version", "0.0.0")):
            return _error(400, "BlueprintsError", "Invalid 'version', must use Semantic "
                          "Versioning")
        fake.blueprints[bp["name"]] = bp
        return 200, {"status": True}

    def compose(self, fake: FakeWeldr, body: bytes) -> tuple[int, Any]:
        if self.headers.get_all("Content-Type") != ["application/json"]:
            return _error(400, "MissingPost", "blueprint must be json")
        try:  # Go's json.Decoder into ComposeRequest: any mistyped field fails the decode
            req = json.loads(body)
            types = {"blueprint_name": str, "compose_type": str, "size": int, "branch": str,
                     "ostree": dict, "upload": dict}
            if not isinstance(req, dict) or any(
                    k in req and req[k] is not None and not isinstance(req[k], t)
                    for k, t in types.items()):
                raise ValueError("cannot unmarshal")
        except ValueError:
            return NOT_FOUND  # sic: api.go answers an undecodable body with 404
        bp = fake.blueprints.get(req.get("blueprint_name", ""))
        if bp is None:
            return _error(400, "UnknownBlueprint",
                          f"Unknown blueprint name: {req.get('blueprint_name')}")
        if req.get("compose_type") not in IMAGE_TYPES:
            return _error(400, "ComposeError", f"Failed to get compose type "
                          f"\"{req.get('compose_type')}\": invalid image type")
        build_id = str(uuid.uuid4())
        fake.composes[build_id] = Compose(bp, req["compose_type"], list(fake.states))
        return 200, {"build_id": build_id, "status": True, "warnings": []}


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, fake: FakeWeldr) -> None:
        super().__init__(path, Handler)
        self.fake = fake


@pytest.fixture
def weldr(tmp_path: Path) -> Iterator[tuple[FakeWeldr, Path]]:
    sock = tmp_path / "api.socket"
    fake = FakeWeldr()
    server = Server(str(sock), fake)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield fake, sock
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- images and a root tar -------------------------------------------------------------

def layer(tmp_path: Path, name: str, **kw: Any) -> LayerSpec:
    path = tmp_path / "layers" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[layer]\nname = "{name}"\n')
    return LayerSpec(name=name, path=path, **kw)


def fedora_image(tmp_path: Path, *layers: LayerSpec, suite: str = "40") -> ImageSpec:
    layers = layers or (
        layer(tmp_path, "base", packages=("kernel", "systemd", "openssh-server"),
              services=Services(enable=("sshd",), disable=("kdump",), mask=("ctrl-alt-del",)),
              kernel_args=("console=ttyS0,115200", "quiet")),
        layer(tmp_path, "virt", packages=("libvirt-daemon", "qemu-kvm", "systemd"),
              services=Services(enable=("libvirtd", "sshd"))),
    )
    return ImageSpec(path=tmp_path / "fnode.toml", name="fnode", version="1.2", release="1",
                     distro="fedora", suite=suite, architecture="amd64", mirror="",
                     security_mirror="", backend="osbuild-composer", layers=layers,
                     source_date_epoch=EPOCH)


def backend(sock: Path, **kw: Any) -> OsbuildBackend:
    return OsbuildBackend(WeldrConfig(socket=sock, poll_interval=0.01, timeout=5.0, **kw))


@pytest.fixture(scope="module")
def root_tar(tmp_path_factory: pytest.TempPathFactory, tiny_rpm: Path) -> bytes:
    """root.tar.xz as osbuild's tar assembler makes it: a root with owners, setuid,
    a file capability (GNU tar --xattrs) and an rpm database."""
    if os.geteuid() != 0:
        pytest.skip("contract test: owners and file capabilities in the tar need root")
    src = tmp_path_factory.mktemp("root")
    (src / "etc").mkdir()
    (src / "etc/os-release").write_text('NAME="Fedora Linux"\nVERSION_ID=40\n')
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/bin/sudo").write_text("sudo\n")
    (src / "usr/bin/sudo").chmod(0o4111)
    (src / "usr/sbin").mkdir()
    (src / "usr/sbin/arping").write_text("arping\n")
    os.setxattr(src / "usr/sbin/arping", "security.capability", CAP_NET_RAW)
    (src / "var/lib/chrony").mkdir(parents=True)
    (src / "var/lib/chrony/drift").write_text("0.0\n")
    os.chown(src / "var/lib/chrony/drift", 1234, 1234)
    os.symlink("../../usr/lib/sysimage/rpm", src / "var/lib/rpm")
    install_rpm(src, tiny_rpm)
    out = tmp_path_factory.mktemp("tar") / "root.tar.xz"
    subprocess.run(["tar", "--create", "--xz", "--file", str(out), "--directory", str(src),
                    "--numeric-owner", "--xattrs", "--xattrs-include=*", "."], check=True)
    return out.read_bytes()


# -- the blueprint -----------------------------------------------------------------------

def test_contract_blueprint_toml_carries_packages_services_kargs(tmp_path: Path) -> None:
    """Contract: the layers become a blueprint that osbuild-composer's TOML reader reads."""
    bp = tomllib.loads(Blueprint.from_image(fedora_image(tmp_path)).toml())
    assert bp["name"] == "fnode" and bp["version"] == "1.2.0"
    assert bp["distro"] == "fedora-40" and bp["arch"] == "x86_64"
    assert [p["name"] for p in bp["packages"]] == [
        "kernel", "systemd", "openssh-server", "libvirt-daemon", "qemu-kvm"]
    assert bp["customizations"]["kernel"] == {"append": "console=ttyS0,115200 quiet"}
    assert bp["customizations"]["services"] == {
        "enabled": ["sshd", "libvirtd"], "disabled": ["kdump"], "masked": ["ctrl-alt-del"]}


@pytest.mark.parametrize("feature, phrase", [
    ("files", "a files tree"), ("hooks", "hooks (10-setup.sh)"),
    ("imgbase_package", "imgbase_package"),
])
def test_contract_inexpressible_feature_is_refused_before_any_request(
        tmp_path: Path, weldr: tuple[FakeWeldr, Path], feature: str, phrase: str) -> None:
    """Contract: a layer feature a blueprint cannot express is refused, nothing is sent."""
    fake, sock = weldr
    hook = tmp_path / "layers/site/10-setup.sh"
    hook.parent.mkdir(parents=True)
    hook.write_text("#!/bin/sh\n")
    options: dict[str, dict[str, Any]] = {
        "files": {"files": hook.parent}, "hooks": {"hooks": (hook,)},
        "imgbase_package": {"imgbase_package": True}}
    extra = options[feature]
    image = fedora_image(tmp_path, layer(tmp_path, "base", packages=("kernel",)),
                         layer(tmp_path, "site", **extra))
    with pytest.raises(InputError) as err:
        backend(sock).build_tree(context(tmp_path, image), tmp_path / "tree")
    assert phrase in err.value.message
    assert "layer 'site'" in err.value.message and "osbuild-composer" in err.value.message
    with pytest.raises(InputError):
        backend(sock).check_image(image)
    assert fake.requests == []


# -- the compose ---------------------------------------------------------------------

def test_contract_happy_path(tmp_path: Path, weldr: tuple[FakeWeldr, Path],
                             root_tar: bytes) -> None:
    """Contract: blueprint pushed, tar compose started, polled to FINISHED, downloaded,
    unpacked into the tree (owners, setuid, capability, rpm database), compose deleted."""
    fake, sock = weldr
    fake.image = root_tar
    ctx = context(tmp_path, fedora_image(tmp_path))
    tree = tmp_path / "tree"
    be = backend(sock)
    be.build_tree(ctx, tree)

    method, path, headers, body = fake.requests[0]
    assert (method, path, headers["Content-Type"]) == ("POST", f"{API}/blueprints/new",
                                                       "text/x-toml")
    pushed = tomllib.loads(body.decode())
    assert [p["name"] for p in pushed["packages"]][:3] == ["kernel", "systemd", "openssh-server"]
    assert pushed["customizations"]["services"]["enabled"] == ["sshd", "libvirtd"]
    assert pushed["customizations"]["kernel"]["append"] == "console=ttyS0,115200 quiet"
    method, path, headers, body = fake.requests[1]
    assert (method, path) == ("POST", f"{API}/compose")
    assert json.loads(body) == {"blueprint_name": "fnode", "compose_type": "tar", "branch": ""}
    build_id = fake.paths()[2].rsplit("/", 1)[-1]
    assert fake.paths()[2:] == [
        *[f"GET {API}/compose/status/{build_id}"] * 3,
        f"GET {API}/compose/image/{build_id}",
        f"DELETE {API}/compose/delete/{build_id}",
    ]
    assert fake.composes == {}

    assert "VERSION_ID=40" in (tree / "etc/os-release").read_text()
    assert stat.S_IMODE((tree / "usr/bin/sudo").stat().st_mode) == 0o4111
    assert os.getxattr(tree / "usr/sbin/arping", "security.capability") == CAP_NET_RAW
    drift = (tree / "var/lib/chrony/drift").stat()
    assert (drift.st_uid, drift.st_gid) == (1234, 1234)
    assert be.installed_packages(tree) == [HELLO]
    assert not (ctx.workdir / "osbuild").exists()
    log = ctx.logfile.read_text()
    assert "blueprint fnode:" in log and f"compose {build_id}: FINISHED" in log


def test_contract_weldr_error_names_id_and_msg(tmp_path: Path,
                                               weldr: tuple[FakeWeldr, Path]) -> None:
    """Contract: {"status": false, "errors": [...]} -> one line with the id and the msg."""
    fake, sock = weldr
    image = fedora_image(tmp_path, suite="99")
    with pytest.raises(ImgbaseError) as err:
        backend(sock).build_tree(context(tmp_path, image), tmp_path / "tree")
    line = err.value.oneline()
    assert "\n" not in line
    assert "BlueprintsError: 'fedora-99' is not a valid distribution" in line
    assert f"POST {API}/blueprints/new" in line
    assert fake.paths() == [f"POST {API}/blueprints/new"]


def test_contract_undecodable_body_404_is_explained(weldr: tuple[FakeWeldr, Path]) -> None:
    """Contract: the Weldr API answers a compose body it cannot decode with 404, not 400;
    the error says so instead of "not found"."""
    fake, sock = weldr
    client = WeldrClient(sock)
    with pytest.raises(ImgbaseError) as err:
        client.request("POST", f"{API}/compose", data=b'{"blueprint_name": 7}',
                       headers={"Content-Type": "application/json"})
    assert "404" in err.value.message
    assert "request body it cannot decode with 404 instead of 400" in err.value.message
    with pytest.raises(ImgbaseError, match="has no GET /api/v1/nowhere"):
        client.request("GET", f"{API}/nowhere")
    client.close()


def test_contract_failed_compose_carries_the_log_excerpt(tmp_path: Path,
                                                         weldr: tuple[FakeWeldr, Path]) -> None:
    """Contract: FAILED -> an error with the end of /compose/log; the whole log in ours."""
    fake, sock = weldr
    fake.states = ["RUNNING", "FAILED"]
    fake.log_text = ("Pipeline build: ok\nstage org.osbuild.rpm\n"
                     "error: package qemu-kvm-9.0 does not verify: no digest\nFailed\n")
    ctx = context(tmp_path, fedora_image(tmp_path))
    with pytest.raises(ImgbaseError) as err:
        backend(sock).build_tree(ctx, tmp_path / "tree")
    assert "FAILED" in err.value.message
    assert "package qemu-kvm-9.0 does not verify: no digest | Failed" in err.value.message
    assert "stage org.osbuild.rpm" in ctx.logfile.read_text()
    assert not any("/image/" in p for p in fake.paths())


def test_contract_timeout_cancels_the_compose(tmp_path: Path,
                                              weldr: tuple[FakeWeldr, Path]) -> None:
    """Contract: still RUNNING at the timeout -> cancelled and an error saying so."""
    fake, sock = weldr
    fake.states = ["RUNNING"]
    be = OsbuildBackend(WeldrConfig(socket=sock, poll_interval=0.05, timeout=0.3))
    with pytest.raises(ImgbaseError, match=r"still RUNNING after \d+ s \(timeout 0.3 s\); "
                                           "cancelled"):
        be.build_tree(context(tmp_path, fedora_image(tmp_path)), tmp_path / "tree")
    assert fake.paths()[-1].startswith(f"DELETE {API}/compose/cancel/")
    polls = [p for p in fake.paths() if "/status/" in p]
    assert 3 <= len(polls) <= 8


def test_contract_socket_absent(tmp_path: Path) -> None:
    """Contract: no socket -> the path and how to start osbuild-composer's socket."""
    sock = tmp_path / "run/weldr/api.socket"
    with pytest.raises(InputError) as err:
        backend(sock).build_tree(context(tmp_path, fedora_image(tmp_path)), tmp_path / "tree")
    assert str(sock) in err.value.message
    assert err.value.hint and "systemctl start osbuild-composer.socket" in err.value.hint


def test_contract_stale_socket_is_a_connection_error(tmp_path: Path) -> None:
    """Contract: a socket file nobody listens on -> 'Connection refused' and the hint."""
    sock = tmp_path / "api.socket"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()
    with pytest.raises(ImgbaseError) as err:
        WeldrClient(sock).request("GET", "/api/status")
    assert "Connection refused" in err.value.message
    assert err.value.hint and "osbuild-composer.socket" in err.value.hint


def test_contract_backend_registers_and_says_why_it_cannot_run_here() -> None:
    """Contract: registered as "osbuild-composer"; without the socket, the reason says so."""
    assert isinstance(ComposerBackend.get("osbuild-composer"), OsbuildBackend)
    if not Path("/run/weldr/api.socket").exists():
        assert OsbuildBackend.runs_here and "not available on Debian" in OsbuildBackend.runs_here
