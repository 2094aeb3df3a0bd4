"""The osbuild-composer backend: a blueprint composed as a "tar" image over the Weldr API.

osbuild-composer (Fedora, RHEL and CentOS Stream; not available on Debian) serves the
Weldr API, the API of lorax-composer it replaced, on the unix socket
/run/weldr/api.socket (``systemctl start osbuild-composer.socket``). This backend is
a small client of it with requests and a transport adapter for unix sockets:

    POST   /api/v1/blueprints/new          the blueprint, TOML (text/x-toml)
    POST   /api/v1/compose                 {"blueprint_name", "compose_type": "tar", "branch"}
    GET    /api/v1/compose/status/UUID     polled until FINISHED or FAILED (or the timeout)
    GET    /api/v1/compose/log/UUID        the osbuild log excerpt of a FAILED compose
    GET    /api/v1/compose/image/UUID      root.tar.xz, unpacked into the tree
    DELETE /api/v1/compose/delete/UUID     the finished compose, once downloaded
    DELETE /api/v1/compose/cancel/UUID     a compose that ran past the timeout

The "tar" image type is the one that yields a plain root tree (the Cloud API, which
osbuild-composer serves over TCP with client certificates, has no such image type;
see docs/backends-fedora.md). A layer feature a blueprint cannot express (a files
tree, hooks, the imgbase .deb) is refused, naming the feature, the layer and this
backend, before anything is sent. Weldr errors, ``{"status": false, "errors": [{"id",
"msg"}]}``, become one line with the id and the message; the API's habit of answering
a request body it cannot decode with 404 instead of 400 gets a message of its own.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import tomli_w
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import NewConnectionError

from ..errors import ImgbaseError, die
from ..image.spec import ImageSpec
from ..run import run
from .backend import BuildContext, ComposerBackend, Package
from .chroot import remove_tree
from .dnf import rpm_arch
from .rpmdb import RPM_DB_PATHS, rpm_packages

WELDR_SOCKET = Path(os.environ.get("IMGBASE_WELDR_SOCKET", "/run/weldr/api.socket"))
API = "/api/v1"
SOCKET_HINT = ("systemctl start osbuild-composer.socket (as root or a member of group weldr; "
               "osbuild-composer is not available on Debian)")
LOG_EXCERPT_LINES = 8
_SEMVER_PARTS = re.compile(r"^\d+(\.\d+){0,2}$")


@dataclass(frozen=True)
class WeldrConfig:
    socket: Path = WELDR_SOCKET
    compose_type: str = "tar"  # the image type whose artifact is a root tree (root.tar.xz)
    poll_interval: float = 10.0  # seconds between status requests
    timeout: float = 4 * 3600.0  # seconds for the whole compose
    request_timeout: float = 120.0  # seconds for one request


# -- the blueprint ----------------------------------------------------------------

@dataclass(frozen=True)
class Blueprint:
    """What an image's layers become in a blueprint: nothing less, nothing more."""

    name: str
    version: str
    description: str
    distro: str
    arch: str
    packages: tuple[str, ...] = ()
    enabled: tuple[str, ...] = ()
    disabled: tuple[str, ...] = ()
    masked: tuple[str, ...] = ()
    kernel_append: str = ""

    @classmethod
    def from_image(cls, image: ImageSpec) -> Blueprint:
        refuse_inexpressible(image)
        return cls(
            name=image.name,
            version=semver(image),
            description=f"imgbase image {image.nvr} (layers: "
                        f"{', '.join(layer.name for layer in image.layers)})",
            distro=f"{image.distro}-{image.suite}",
            arch=rpm_arch(image.architecture),
            packages=image.packages,
            enabled=_units(image, "enable"),
            disabled=_units(image, "disable"),
            masked=_units(image, "mask"),
            kernel_append=" ".join(image.kernel_args),
        )

    def toml(self) -> str:
        """The blueprint as TOML (osbuild-composer's blueprint reference), written by a
        TOML library."""
        doc: dict[str, Any] = {"name": self.name, "description": self.description,
                               "version": self.version, "distro": self.distro,
                               "arch": self.arch,
                               "packages": [{"name": p, "version": "*"} for p in self.packages]}
        customizations: dict[str, Any] = {}
        if self.kernel_append:
            customizations["kernel"] = {"append": self.kernel_append}
        services = {key: list(units) for key, units in (
            ("enabled", self.enabled), ("disabled", self.disabled), ("masked", self.masked))
            if units}
        if services:
            customizations["services"] = services
        if customizations:
            doc["customizations"] = customizations
        return tomli_w.dumps(doc)


def refuse_inexpressible(image: ImageSpec) -> None:
    """Die on the first layer feature a blueprint cannot express, rather than drop it."""
    if image.distro in ("debian", "ubuntu"):
        die(f"the osbuild-composer backend composes rpm distributions, not {image.distro}",
            hint=f"set distro and suite (e.g. fedora, 40) in {image.path}, or use mmdebstrap")
    for layer in image.layers:
        features = []
        if layer.files:
            features.append(f"a files tree ({layer.files})")
        if layer.hooks:
            features.append(f"hooks ({', '.join(hook.name for hook in layer.hooks)})")
        if layer.imgbase_package:
            features.append("imgbase_package (imgbase as a Debian package)")
        if features:
            die(f"layer {layer.name!r} ({layer.path}) has {features[0]}, which an "
                "osbuild-composer blueprint cannot express (backend osbuild-composer)",
                hint="a blueprint holds packages, services and kernel arguments only: move "
                     "it into a package, or compose with the lorax or dnf backend")


def semver(image: ImageSpec) -> str:
    """A blueprint's version must be semantic (X.Y.Z): 1.0 -> 1.0.0."""
    if not _SEMVER_PARTS.match(image.version):
        die(f"image version {image.version!r} cannot be a blueprint version (X.Y.Z)",
            hint=f"use up to three numbers for the version in {image.path}")
    parts = image.version.split(".")
    return ".".join(parts + ["0"] * (3 - len(parts)))


def _units(image: ImageSpec, verb: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(unit for layer in image.layers
                               for unit in getattr(layer.services, verb)))


# -- requests over a unix socket ----------------------------------------------------

class UnixHTTPConnection(HTTPConnection):
    """An HTTP connection whose socket is AF_UNIX (the host name is only for Host:)."""

    def __init__(self, *args: Any, socket_path: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if isinstance(self.timeout, int | float):
            sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise NewConnectionError(self, f"{self.socket_path}: {exc.strerror or exc}") from exc
        return sock


class UnixHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = UnixHTTPConnection


class UnixSocketAdapter(HTTPAdapter):
    """Every request mounted on this adapter goes to one unix socket, never a proxy."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(max_retries=0)
        self.pool = UnixHTTPConnectionPool("localhost", socket_path=str(socket_path))

    def get_connection_with_tls_context(self, request: requests.PreparedRequest, verify: Any,
                                        proxies: Any = None,
                                        cert: Any = None) -> HTTPConnectionPool:
        return self.pool

    def get_connection(self, url: Any, proxies: Any = None) -> HTTPConnectionPool:
        return self.pool

    def request_url(self, request: requests.PreparedRequest, proxies: Any) -> str:
        return request.path_url

    def close(self) -> None:
        self.pool.close()
        super().close()


# -- the Weldr client ---------------------------------------------------------------

@dataclass
class WeldrClient:
    """Weldr API v1 requests; every failure is one ImgbaseError line."""

    socket: Path
    request_timeout: float = 120.0
    logfile: Path | None = None
    session: requests.Session = field(init=False)

    def __post_init__(self) -> None:
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy, no netrc for a local socket
        self.session.mount("http+unix://", UnixSocketAdapter(self.socket))

    def close(self) -> None:
        self.session.close()

    def log(self, text: str) -> None:
        if self.logfile:
            with open(self.logfile, "a", encoding="utf-8") as out:
                out.write(f"weldr: {text}\n")

    def check_socket(self) -> None:
        try:
            mode = self.socket.stat().st_mode
        except FileNotFoundError:
            die(f"osbuild-composer's Weldr API socket {self.socket} does not exist",
                hint=SOCKET_HINT)
        except PermissionError:
            die(f"no permission to reach {self.socket}", hint=SOCKET_HINT)
        if not stat.S_ISSOCK(mode):
            die(f"{self.socket} is not a socket", hint=SOCKET_HINT)

    def request(self, method: str, path: str, *, stream: bool = False,
                **kwargs: Any) -> requests.Response:
        self.check_socket()
        try:
            resp = self.session.request(method, f"http+unix://weldr{path}", stream=stream,
                                        timeout=self.request_timeout, **kwargs)
        except requests.Timeout as exc:
            raise ImgbaseError(f"osbuild-composer did not answer {method} {path} within "
                               f"{self.request_timeout:g} s",
                               hint="is osbuild-composer busy or hung? journalctl "
                                    "-u osbuild-composer") from exc
        except requests.ConnectionError as exc:
            raise ImgbaseError(f"cannot talk to osbuild-composer at {self.socket}: "
                               f"{_reason(exc)}", hint=SOCKET_HINT) from exc
        self.log(f"{method} {path} -> {resp.status_code}")
        failed = resp.status_code >= 400
        if not failed and not stream and _is_json(resp):  # every reply says JSON, even logs
            try:
                body = resp.json()
            except ValueError:
                body = None
            failed = isinstance(body, dict) and body.get("status") is False
        if failed:
            raise weldr_error(method, path, resp, self.logfile)
        return resp

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.request(method, path, **kwargs)
        try:
            return resp.json()
        except ValueError as exc:
            raise ImgbaseError(f"osbuild-composer answered {method} {path} with "
                               f"something not JSON: {resp.text[:80]!r}") from exc

    # -- the calls one compose makes ---------------------------------------------
    def push_blueprint(self, blueprint: Blueprint) -> None:
        text = blueprint.toml()
        self.log(f"blueprint {blueprint.name}:\n{text}")
        self.json("POST", f"{API}/blueprints/new", data=text.encode(),
                  headers={"Content-Type": "text/x-toml"})

    def start_compose(self, blueprint: str, compose_type: str) -> str:
        reply = self.json("POST", f"{API}/compose",
                          json={"blueprint_name": blueprint, "compose_type": compose_type,
                                "branch": ""})
        for warning in reply.get("warnings") or []:
            self.log(f"warning: {warning}")
        build_id = reply.get("build_id")
        if not isinstance(build_id, str):
            raise ImgbaseError(f"osbuild-composer started a compose without a build_id: {reply}")
        return build_id

    def status(self, build_id: str) -> str:
        reply = self.json("GET", f"{API}/compose/status/{build_id}")
        entries = [e for e in reply.get("uuids", []) if e.get("id") == build_id]
        if not entries:
            raise ImgbaseError(f"osbuild-composer knows no compose {build_id}",
                               hint="was it deleted, or osbuild-composer's state reset?")
        return str(entries[0].get("queue_status", ""))

    def wait(self, build_id: str, interval: float, timeout: float,
             on_state: Callable[[str, float], None] | None = None) -> None:
        """Poll until FINISHED; FAILED or the timeout is an error (the latter cancels)."""
        start = time.monotonic()
        last = ""
        while True:
            state = self.status(build_id)
            waited = time.monotonic() - start
            if state != last:
                self.log(f"compose {build_id}: {state} after {waited:.0f} s")
                last = state
            if on_state:
                on_state(state, waited)
            if state == "FINISHED":
                return
            if state == "FAILED":
                raise ImgbaseError(f"osbuild-composer compose {build_id} FAILED"
                                   f"{self.log_excerpt(build_id)}",
                                   hint=f"the whole osbuild log is in {self.logfile}")
            if waited + interval > timeout:
                self.cancel(build_id)
                raise ImgbaseError(f"osbuild-composer compose {build_id} still {state} "
                                   f"after {waited:.0f} s (timeout {timeout:g} s); cancelled",
                                   hint="raise the timeout, or look at "
                                        "journalctl -u osbuild-worker@*")
            time.sleep(interval)

    def log_excerpt(self, build_id: str) -> str:
        """': <the last lines of the osbuild log>' (the whole log goes to the build log)."""
        try:
            text = self.request("GET", f"{API}/compose/log/{build_id}").text
        except ImgbaseError as exc:
            self.log(f"no log for {build_id}: {exc.oneline()}")
            return ""
        self.log(f"osbuild log of {build_id}:\n{text}")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return ": " + " | ".join(lines[-LOG_EXCERPT_LINES:]) if lines else ""

    def cancel(self, build_id: str) -> None:
        try:
            self.request("DELETE", f"{API}/compose/cancel/{build_id}")
        except ImgbaseError as exc:
            self.log(f"cancel {build_id}: {exc.oneline()}")

    def download_image(self, build_id: str, dest: Path) -> int:
        resp = self.request("GET", f"{API}/compose/image/{build_id}", stream=True)
        size = 0
        try:
            with open(dest, "wb") as out:
                for chunk in resp.iter_content(1 << 20):
                    out.write(chunk)
                    size += len(chunk)
        except requests.RequestException as exc:
            raise ImgbaseError(f"downloading the image of compose {build_id} failed after "
                               f"{size} bytes: {_reason(exc)}") from exc
        finally:
            resp.close()
        expected = resp.headers.get("Content-Length")
        if expected is not None and int(expected) != size:
            raise ImgbaseError(f"the image of compose {build_id} is {size} bytes, "
                               f"osbuild-composer announced {expected}")
        self.log(f"image of {build_id}: {size} bytes -> {dest}")
        return size

    def delete(self, build_id: str) -> None:
        try:
            reply = self.json("DELETE", f"{API}/compose/delete/{build_id}")
        except ImgbaseError as exc:
            self.log(f"delete {build_id}: {exc.oneline()}")
            return
        for error in reply.get("errors") or []:
            self.log(f"delete {build_id}: {error.get('id')}: {error.get('msg')}")


def _is_json(resp: requests.Response) -> bool:
    return resp.headers.get("Content-Type", "").startswith("application/json")


def _reason(exc: BaseException) -> str:
    """The innermost OS error under requests' and urllib3's wrappers (e.g. 'Connection refused')."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        inner = seen.__cause__ or getattr(seen, "reason", None)
        if inner is None and seen.args and isinstance(seen.args[0], BaseException):
            inner = seen.args[0]
        seen = inner if isinstance(inner, BaseException) else seen.__context__
    return str(exc)


def weldr_error(method: str, path: str, resp: requests.Response,
                logfile: Path | None = None) -> ImgbaseError:
    """One line from a Weldr error reply: ``{"status": false, "errors": [{"id", "msg"}]}``."""
    errors: list[Mapping[str, Any]] = []
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        errors = [e for e in body["errors"] if isinstance(e, dict)]
    where = f"{method} {path}"
    see = f"see the build log {logfile}" if logfile else "journalctl -u osbuild-composer"
    if resp.status_code == 404 and method != "GET" and (
            not errors or all(e.get("id") == "HTTPError" for e in errors)):
        # osbuild-composer's weldr/api.go: a body that does not decode -> 404 HTTPError
        return ImgbaseError(
            f"osbuild-composer answered {where} with 404 Not Found: its Weldr API answers a "
            "request body it cannot decode with 404 instead of 400, so it did not understand "
            "the request imgbase sent",
            hint=f"an osbuild-composer whose Weldr API differs from the one imgbase speaks? {see}")
    if resp.status_code == 404 and (not errors or errors[0].get("id") == "HTTPError"):
        return ImgbaseError(f"osbuild-composer has no {where} (404 Not Found)",
                            hint="is the socket an osbuild-composer Weldr API v1 socket?")
    if errors:
        text = "; ".join(f"{e.get('id', '?')}: {e.get('msg', '')}" for e in errors)
        return ImgbaseError(f"osbuild-composer refused {where}: {text}", hint=see)
    detail = resp.text.strip().splitlines()[0][:120] if resp.text.strip() else resp.reason
    return ImgbaseError(f"osbuild-composer answered {where} with HTTP {resp.status_code}: "
                        f"{detail}", hint=see)


# -- the backend --------------------------------------------------------------------

class OsbuildBackend(ComposerBackend):
    name = "osbuild-composer"
    summary = ("Fedora/RHEL: a blueprint composed by osbuild-composer over the Weldr API "
               "(contract-tested)")
    tools = {"tar": "tar", "xz": "xz-utils", "rpm": "rpm"}

    runs_here = None if WELDR_SOCKET.exists() else (
        f"no Weldr API socket at {WELDR_SOCKET}: osbuild-composer is not available on Debian "
        "(contract-tested only there); on Fedora/RHEL: systemctl start osbuild-composer.socket")

    def __init__(self, config: WeldrConfig | None = None) -> None:
        self.config = config or WeldrConfig()

    def check_image(self, image: ImageSpec) -> None:
        Blueprint.from_image(image)

    def build_tree(self, ctx: BuildContext, tree: Path) -> None:
        blueprint = Blueprint.from_image(ctx.image)
        config = self.config
        work = ctx.workdir / "osbuild"
        work.mkdir(parents=True, exist_ok=True)
        client = WeldrClient(config.socket, config.request_timeout, ctx.logfile)
        try:
            client.push_blueprint(blueprint)
            build_id = client.start_compose(blueprint.name, config.compose_type)

            def on_state(state: str, waited: float) -> None:
                ctx.progress.status(f"compose {build_id[:8]} {state} ({waited:.0f} s)")

            client.wait(build_id, config.poll_interval, config.timeout, on_state)
            archive = work / "root.tar.xz"
            size = client.download_image(build_id, archive)
            ctx.progress.status(f"unpacking {size / 1e6:.0f} MB")
            client.delete(build_id)
        finally:
            client.close()
        unpack_tar(archive, tree)
        remove_tree(work)

    def installed_packages(self, tree: Path) -> list[Package]:
        return rpm_packages(tree)

    def package_db_paths(self) -> tuple[str, ...]:
        return RPM_DB_PATHS


def unpack_tar(archive: Path, tree: Path) -> None:
    """The image's root.tar.xz into the tree: numeric owners, modes, extended attributes."""
    tree.mkdir(parents=True, exist_ok=True)
    run(["tar", "--extract", "--file", str(archive), "--directory", str(tree),
         "--numeric-owner", "--preserve-permissions", "--xattrs", "--xattrs-include=*"])

