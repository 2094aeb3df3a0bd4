"""Downloading an image over HTTP from a real server on 127.0.0.1: resumed after the
connection breaks, started over when the server ignores ranges, sidecars fetched."""

from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgbase.errors import InputError
from imgbase.image import fetch
from imgbase.progress import Progress

BODY = bytes(range(256)) * 4096 * 3  # 3 MiB
SUMS = b"0" * 64 + b"  n\n"


class Server(http.server.ThreadingHTTPServer):
    files: dict[str, bytes]
    break_after: int | None  # bytes, once: then the connection is dropped
    ranges: bool
    requests_seen: list[tuple[str, str | None]]


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests_seen.append((self.path, rng))
        body = srv.files.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404)
            return
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng and srv.ranges else 0
        if start >= len(body) and rng:
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        chunk = body[start:]
        if srv.break_after is not None and self.path.endswith(".squashfs"):
            self.wfile.write(chunk[:srv.break_after])
            srv.break_after = None
            self.wfile.flush()
            self.connection.shutdown(2)  # the network goes away mid-download
            return
        self.wfile.write(chunk)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(("127.0.0.1", 0), Handler)
    srv.files, srv.break_after, srv.ranges, srv.requests_seen = {}, None, True, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()


def url(srv: Server, path: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def test_a_broken_download_resumes_where_it_stopped(server: Server, tmp_path: Path) -> None:
    server.files = {"/n-2.0-1.squashfs": BODY, "/n-2.0-1.squashfs.sha256": SUMS}
    server.break_after = 1 << 20
    with pytest.raises(InputError, match="broke off at 1 of 3 MiB") as e:
        fetch.fetch(url(server, "/n-2.0-1.squashfs"), Progress(), tmp_path, insecure=True)
    assert "run the same command again to resume" in (e.value.hint or "")
    assert (tmp_path / "n-2.0-1.squashfs.part").stat().st_size == 1 << 20
    assert not (tmp_path / "n-2.0-1.squashfs").exists()
    got = fetch.fetch(url(server, "/n-2.0-1.squashfs"), Progress(), tmp_path, insecure=True)
    assert got == tmp_path / "n-2.0-1.squashfs" and got.read_bytes() == BODY
    assert server.requests_seen[-1] == ("/n-2.0-1.squashfs", f"bytes={1 << 20}-")
    assert (tmp_path / "n-2.0-1.squashfs.sha256").read_bytes() == SUMS
    assert not (tmp_path / "n-2.0-1.squashfs.sha256.sig").exists()  # 404: none
    assert not (tmp_path / "n-2.0-1.squashfs.part").exists()


def test_a_part_of_another_url_is_not_resumed(server: Server, tmp_path: Path) -> None:
    server.files = {"/v3/n.squashfs": BODY}
    (tmp_path / "n.squashfs.part").write_bytes(BODY[:100])
    (tmp_path / "n.squashfs.part.url").write_text(url(server, "/v2/n.squashfs"))
    got = fetch.fetch(url(server, "/v3/n.squashfs"), Progress(), tmp_path, insecure=True)
    assert got.read_bytes() == BODY
    assert server.requests_seen[-1] == ("/v3/n.squashfs", None)  # from the start


def test_sidecars_sit_next_to_the_image_even_with_a_query(server: Server,
                                                          tmp_path: Path) -> None:
    server.files = {"/n.squashfs": BODY, "/n.squashfs.sha256": SUMS}
    server.requests_seen.clear()
    got = fetch.fetch(url(server, "/n.squashfs") + "?token=abc", Progress(), tmp_path,
                      insecure=True)
    assert got.name == "n.squashfs" and (tmp_path / "n.squashfs.sha256").exists()
    assert ("/n.squashfs.sha256?token=abc", None) in server.requests_seen


def test_a_server_without_ranges_starts_over(server: Server, tmp_path: Path) -> None:
    server.files = {"/n.squashfs": BODY}
    server.ranges = False
    (tmp_path / "n.squashfs.part").write_bytes(b"stale bytes from an older image")
    got = fetch.fetch(url(server, "/n.squashfs"), Progress(), tmp_path, insecure=True)
    assert got.read_bytes() == BODY


def test_a_missing_image_is_a_clear_error(server: Server, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"cannot fetch .*/nope.squashfs: HTTP 404"):
        fetch.fetch(url(server, "/nope.squashfs"), Progress(), tmp_path, insecure=True)
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot fetch http://127.0.0.1:9/x.squashfs"):
        fetch.fetch("http://127.0.0.1:9/x.squashfs", Progress(), tmp_path, insecure=True)


def test_missing_sidecars_stop_before_the_image_is_asked_for(server: Server,
                                                            tmp_path: Path) -> None:
    server.files = {"/n.squashfs": BODY}
    with pytest.raises(InputError, match=r"n.squashfs.sha256 is missing: the image cannot"):
        fetch.fetch(url(server, "/n.squashfs"), Progress(), tmp_path / "dl")
    assert all(not path.endswith(".squashfs") for path, _ in server.requests_seen)
    assert list((tmp_path / "dl").iterdir()) == []
    server.files["/n.squashfs.sha256"] = SUMS  # a checksum but no signature: the same
    with pytest.raises(InputError, match=r"is not signed \(.*\.sig is missing\)"):
        fetch.fetch(url(server, "/n.squashfs"), Progress(), tmp_path / "dl")
    assert all(not path.endswith(".squashfs") for path, _ in server.requests_seen)
    assert not (tmp_path / "dl/n.squashfs.part").exists()


def test_a_signature_by_an_unknown_key_stops_before_the_image(server: Server,
                                                             tmp_path: Path) -> None:
    from tests.images import signing_key, stop_agent

    home = signing_key(tmp_path / "gnupg", tmp_path / "key.gpg")
    (tmp_path / "n.squashfs").write_bytes(BODY)
    (tmp_path / "n.squashfs.sha256").write_bytes(SUMS)
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--detach-sign", "--output",
                    str(tmp_path / "sig"), str(tmp_path / "n.squashfs.sha256")], check=True)
    stop_agent(home)
    server.files = {"/n.squashfs": BODY, "/n.squashfs.sha256": SUMS,
                    "/n.squashfs.sha256.sig": (tmp_path / "sig").read_bytes()}
    (tmp_path / "trusted.d").mkdir()  # the key is not in it: nothing trusted
    (tmp_path / "trusted.d/other.gpg").write_bytes(b"")
    with pytest.raises(InputError, match="which is not in|could not be checked"):
        fetch.fetch(url(server, "/n.squashfs"), Progress(), tmp_path / "dl",
                    trusted=tmp_path / "trusted.d")
    assert all(not path.endswith(".squashfs") for path, _ in server.requests_seen)


def test_the_url_with_its_token_is_kept_root_only(server: Server, tmp_path: Path) -> None:
    server.files = {"/n.squashfs": BODY, "/n.squashfs.sha256": SUMS}
    server.break_after = 1 << 20
    dl = tmp_path / "dl"
    dl.mkdir(mode=0o755)
    with pytest.raises(InputError, match="broke off"):
        fetch.fetch(url(server, "/n.squashfs"), Progress(), dl, insecure=True)
    assert (dl / "n.squashfs.part.url").read_text() == url(server, "/n.squashfs")
    assert (dl / "n.squashfs.part.url").stat().st_mode & 0o777 == 0o600
    assert dl.stat().st_mode & 0o777 == 0o700
