"""Fetch an image from an http(s) URL, resumably, with its .sha256 and .sha256.sig.

Downloads go to ``/var/lib/imgbase/downloads`` (on /var, so they outlive a layer) as
``NAME.part`` and are renamed to ``NAME`` once complete. A download cut short keeps its
``.part``; running the same command again asks the server for the rest (``Range``) and
starts over only when the server does not do ranges. The checksum and signature files
are fetched first, next to the image, where :mod:`imgbase.image.trust` looks for them, and
judged before the image is asked for: a server without them (404) or a signature that is
bad or by an untrusted key stops the download before its first byte, unless the image
may be accepted unsigned (``--insecure`` where the node allows it). The downloads
directory is root-only (0700): a ``.part.url`` holds the URL, token and all.

>>> is_url("https://example.org/n-2.0-1.squashfs"), is_url("/var/tmp/n.squashfs")
(True, False)
>>> name_from_url("http://127.0.0.1:8080/images/n-2.0-1.squashfs?token=x")
'n-2.0-1.squashfs'
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import die
from ..progress import Progress
from . import trust

DOWNLOADS = Path("/var/lib/imgbase/downloads")
CHUNK = 1 << 20
TIMEOUT = 30  # seconds without a byte before a download counts as failed
SIDECARS = (".sha256", ".sha256.sig")


def sidecar_url(url: str, suffix: str) -> str:
    """The URL of IMAGE<suffix> next to IMAGE, query and all.

    >>> sidecar_url("https://h/i/n.squashfs?token=x", ".sha256")
    'https://h/i/n.squashfs.sha256?token=x'
    """
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path + suffix))


def is_url(source: str) -> bool:
    return urlsplit(source).scheme in ("http", "https")


def name_from_url(url: str) -> str:
    name = PurePosixPath(urlsplit(url).path).name
    if not name or name in (".", ".."):
        die(f"{url} does not name a file", hint="give the URL of the .squashfs itself")
    return name


def _requests() -> Any:
    try:
        import requests
    except ImportError:
        die("downloading needs python3-requests", hint="apt install python3-requests")
    return requests


def _small(url: str, dest: Path) -> bool:
    """Fetch a sidecar file whole; False when the server has none (404)."""
    requests = _requests()
    try:
        resp = requests.get(url, timeout=TIMEOUT)
    except requests.RequestException as exc:
        die(f"cannot fetch {url}: {exc}", hint="check the URL and the network, then retry")
    if resp.status_code == 404:
        dest.unlink(missing_ok=True)
        return False
    if resp.status_code != 200:
        die(f"cannot fetch {url}: HTTP {resp.status_code}", hint="check the URL")
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(resp.content)
    os.replace(tmp, dest)
    return True


def fetch(url: str, progress: Progress, downloads: Path = DOWNLOADS, *,
          insecure: bool = False, trusted: Path = trust.TRUSTED) -> Path:
    """Download url's sidecars, judge them, then the image (resuming a .part); return
    the local image path. insecure: an unsigned image may be accepted (the caller has
    checked that the node allows it)."""
    requests = _requests()
    name = name_from_url(url)
    trust.private_dir(downloads)
    final, part = downloads / name, downloads / f"{name}.part"
    for suffix in SIDECARS:  # small, fetched first: a bad URL fails before the big one
        _small(sidecar_url(url, suffix), downloads / f"{name}{suffix}")
    # refused here, before the big download, unless insecure excuses it
    trust.judge(url, trust.read_sidecars(str(final)), insecure=insecure, trusted=trusted)
    origin = downloads / f"{name}.part.url"  # a .part resumes only from the URL it came from
    if part.exists() and (not origin.exists() or origin.read_text() != url):
        part.unlink()
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = requests.get(url, headers=headers, stream=True, timeout=TIMEOUT)
    except requests.RequestException as exc:
        die(f"cannot fetch {url}: {exc}", hint="check the URL and the network, then retry")
    with resp:
        if resp.status_code == 416 and have:  # nothing left: the .part is the whole file
            size = resp.headers.get("Content-Range", "").rpartition("/")[2]
            if size != str(have):
                part.unlink()
                die(f"{url} is {size or 'of unknown size'} bytes, the partial download "
                    f"{have}: it was of another file", hint="run the same command again")
            os.replace(part, final)
            origin.unlink(missing_ok=True)
            return final
        if resp.status_code not in (200, 206):
            die(f"cannot fetch {url}: HTTP {resp.status_code}", hint="check the URL")
        if resp.status_code == 200:
            have = 0  # the server ignored the range: start over
        elif not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            die(f"{url} answered a range that does not start at byte {have}",
                hint=f"remove {part} and run the same command again")
        rest = int(resp.headers.get("Content-Length", "0") or 0)
        total = have + rest if rest else None
        free = shutil.disk_usage(downloads).free
        if rest and rest > free:
            die(f"{downloads} has {free >> 20} MiB free, the download needs {rest >> 20} MiB",
                hint="free space on /var, or download the image yourself and give its path")
        fd = os.open(origin, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:  # the URL may carry a token
            os.fchmod(f.fileno(), 0o600)
            f.write(url)
        progress.emit("download-start", url=url, resume_from=have, total=total)
        done, last, broke = have, 0.0, ""
        try:
            with open(part, "ab" if have else "wb") as out:
                for chunk in resp.iter_content(CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if time.monotonic() - last > 1:
                        last = time.monotonic()
                        progress.emit("download", url=url, done=done, total=total)
                        progress.status(f"{done >> 20} of "
                                        f"{'?' if total is None else total >> 20} MiB")
                out.flush()
                os.fsync(out.fileno())
        except requests.RequestException as exc:
            broke = f" ({type(exc).__name__})"
        if broke or (total is not None and done != total):
            of = "" if total is None else f" of {total >> 20}"
            die(f"the download of {url} broke off at {done >> 20}{of} MiB{broke}",
                hint="run the same command again to resume it")
    os.replace(part, final)
    origin.unlink(missing_ok=True)
    progress.emit("download-done", url=url, path=str(final), size=done)
    return final
