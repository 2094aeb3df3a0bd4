"""Is this image the one its publisher signed?  Checksums, OpenPGP signatures, trusted keys.

An image travels with two small files: ``IMAGE.sha256`` (written by ``imgbase compose``)
and ``IMAGE.sha256.sig``, a detached OpenPGP signature of that checksum file
(``imgbase sign``). Signing the checksum rather than the image keeps verification to one
pass over the image. A node trusts the public keys it finds in ``/etc/imgbase/trusted.d/``
(``*.gpg``, binary keyrings as ``gpg --export`` writes them) and checks with ``gpgv``,
which takes its keys from nowhere else.

Every way an image enters a node (``update``, ``install``, ``base --add``, and so the
agent) goes through :func:`verified_copy`, in this order: the two small files are read
into memory once; the signature is checked (gpgv on private copies of those bytes)
before anything parses the image; then the image is copied into a root-only directory
(``/var/lib/imgbase/images``, 0700), hashed in the same pass, and the hash compared.
What follows (image.json, the unpack, the delta sync, the kernel arguments) reads that
copy only, so a file swapped at the original path after the check changes nothing.

Unsigned images are refused unless ``--insecure`` is given *and* the node allows it
(``allow_insecure = true`` in ``[trust]`` of ``/etc/imgbase/imgbase.toml``); even then a
checksum that does not match or a signature that is bad is refused.

>>> parse_gpgv_status("[GNUPG:] NEWSIG\\n[GNUPG:] GOODSIG 0123ABCD test <t@x>\\n"
...                   "[GNUPG:] VALIDSIG AAAABBBB 2026-11-22 1 0 4 0 22 8 01 AAAABBBB\\n")
('good', 'AAAABBBB')
>>> parse_gpgv_status("[GNUPG:] ERRSIG 0123ABCD 22 8 00 1 9\\n[GNUPG:] NO_PUBKEY 0123ABCD\\n")
('no-key', '0123ABCD')
>>> parse_gpgv_status("[GNUPG:] BADSIG 0123ABCD test <t@x>\\n")
('bad', '0123ABCD')
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import CONFIG
from ..config import load as config_load
from ..errors import ImageRefused, InputError, die, refuse
from ..plan import Step
from ..run import run
from .kargs import check_args
from .naming import Nvr
from .squashfs import sha256_file

TRUSTED = Path("/etc/imgbase/trusted.d")
IMAGES = Path("/var/lib/imgbase/images")  # verified copies, root-only
ACCEPTED = Path("/var/lib/imgbase/accepted.json")  # anti-rollback: newest NVR per product
KEY_TAG = "imgbase:key:"  # on a base: the fingerprint of the key its image was signed with
SMALL_MAX = 1 << 16  # a .sha256 or .sig larger than this is not one
CHUNK = 1 << 20
BLKROGET = 0x125E
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
INSECURE = "missing (--insecure)"


@dataclass(frozen=True)
class Verdict:
    checksum: str  # "verified" | "missing (--insecure)"
    signature: str  # "signed by <fingerprint>" | "missing (--insecure)"


@dataclass(frozen=True)
class Sidecars:
    """IMAGE.sha256 and its signature, as bytes read once (None: the file is missing)."""

    sums: bytes | None
    sig: bytes | None
    sums_name: str  # for messages
    sig_name: str


@dataclass(frozen=True)
class Verified:
    """An image that passed: the path to use from here on, and what vouches for it."""

    path: Path  # the verified copy (or a read-only device, checked in place)
    nvr: str
    key: str | None  # the signing key's fingerprint; None: accepted unsigned (--insecure)
    checksum: str  # "verified" | "missing (--insecure)"
    kernel_args: tuple[str, ...] = ()
    copy: bool = True  # path is a copy of ours: discard() removes it

    @property
    def verdict(self) -> Verdict:
        return Verdict(self.checksum, INSECURE if self.key is None else f"signed by {self.key}")

    def discard(self) -> None:
        if self.copy:
            self.path.unlink(missing_ok=True)


def sums_path(image: str) -> Path:
    return Path(f"{image}.sha256")


def sig_path(image: str) -> Path:
    return Path(f"{image}.sha256.sig")


def parse_gpgv_status(text: str) -> tuple[str, str]:
    """(good|bad|no-key|expired|unknown, key) from gpgv's --status-fd lines."""
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "[GNUPG:]":
            continue
        kind, key = words[1], words[2]
        if kind == "VALIDSIG":
            return "good", key
        if kind == "BADSIG":
            return "bad", key
        if kind == "NO_PUBKEY":
            return "no-key", key
        if kind in ("EXPKEYSIG", "REVKEYSIG", "EXPSIG"):
            return "expired", key
    return "unknown", ""


def keyrings(trusted: Path = TRUSTED) -> list[Path]:
    return sorted(p for p in trusted.glob("*.gpg") if p.is_file()) if trusted.is_dir() else []


# -- the node's policy: may an unsigned image be accepted at all? -------------------------

def check_insecure(insecure: bool, config: Path = CONFIG) -> None:
    """--insecure is honoured only where the node's config allows it."""
    if insecure and not config_load(config).trust.allow_insecure:
        die(f"--insecure is not allowed on this node ({config} has no "
            "[trust] allow_insecure = true)",
            hint="sign the image (imgbase sign) and trust its key, or set allow_insecure")


# -- the small files, read once ---------------------------------------------------------

def _read_small(path: Path) -> bytes | None:
    """A regular file's bytes, at most SMALL_MAX; None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        die(f"cannot read {path}: {exc.strerror}", hint="check the file")
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            die(f"{path} is not a regular file", hint="give the file published with the image")
        data = f.read(SMALL_MAX + 1)
    if len(data) > SMALL_MAX:
        die(f"{path} is larger than {SMALL_MAX} bytes: not a checksum or signature file",
            hint="get the .sha256 and .sha256.sig published with the image")
    return data


def read_sidecars(image: str, sums: Path | None = None) -> Sidecars:
    """IMAGE.sha256 (or sums) and its .sig next to it, each read once into memory."""
    sums = sums or sums_path(image)
    sig = Path(f"{sums}.sig")
    return Sidecars(_read_small(sums), _read_small(sig), str(sums), str(sig))


def want_sha256(side: Sidecars) -> str:
    words = (side.sums or b"").decode(errors="replace").split()
    if not words or not SHA256_RE.match(words[0]):
        refuse(f"{side.sums_name} holds no sha256", hint="get it from the publisher again")
    return words[0]


def verify_signature(side: Sidecars, trusted: Path = TRUSTED, insecure: bool = False) -> str:
    """The signing key's fingerprint; die when the signature is not good and trusted.
    gpgv reads private copies of the bytes that were read once, never the paths."""
    rings = keyrings(trusted)
    if not rings:
        die(f"no trusted keys in {trusted}: the signature of {side.sums_name} cannot be "
            "checked", hint=f"put the publisher's key there (gpg --export KEY > "
            f"{trusted}/site.gpg)" + ("" if insecure else ", or pass --insecure"))
    assert side.sums is not None and side.sig is not None
    with tempfile.TemporaryDirectory(prefix="imgbase-gpgv.") as home:  # 0700
        sums, sig = Path(home, "image.sha256"), Path(home, "image.sha256.sig")
        sums.write_bytes(side.sums)
        sig.write_bytes(side.sig)
        argv = ["gpgv", "--homedir", home, "--status-fd", "1"]
        for ring in rings:
            argv += ["--keyring", str(ring.resolve())]
        proc = run([*argv, str(sig), str(sums)], check=False)
    verdict, key = parse_gpgv_status(proc.stdout)
    if verdict == "good" and proc.returncode == 0:
        return key
    why = {"bad": f"is BAD (made by key {key}, but {side.sums_name} is not what it signed)",
           "no-key": f"was made by key {key}, which is not in {trusted}",
           "expired": f"was made by key {key}, which is expired or revoked"}.get(
               verdict, f"could not be checked: {proc.stderr.strip().splitlines()[-1:]}")
    refuse(f"the signature {side.sig_name} {why}",
        hint="get the image, its .sha256 and .sha256.sig from the publisher again")


def judge(image: str, side: Sidecars, *, insecure: bool,
          trusted: Path = TRUSTED) -> tuple[str | None, str | None]:
    """(the sha256 the image must have or None, the signing key or None), from the small
    files alone: the image is not opened. Refuses what insecure does not excuse."""
    if side.sums is None:
        if not insecure:
            die(f"{side.sums_name} is missing: the image cannot be verified",
                hint="put the .sha256 and .sha256.sig published with it next to it, "
                "or pass --insecure")
        if side.sig is not None:
            die(f"{side.sig_name} is there but {side.sums_name} is not",
                hint="get both from the publisher")
        return None, None
    key = None
    if side.sig is not None:
        key = verify_signature(side, trusted, insecure)
    elif not insecure:
        die(f"{image} is not signed ({side.sig_name} is missing)",
            hint="sign it with imgbase sign, or pass --insecure to accept it unsigned")
    return want_sha256(side), key


def _mismatch(image: str, got: str, want: str, sums_name: str) -> None:
    refuse(f"{image}: sha256 {got[:16]}… does not match {sums_name} ({want[:16]}…)",
        hint="the image is corrupt or not the one published; download it again")


def verify_image(image: str, *, insecure: bool, trusted: Path = TRUSTED) -> Verdict:
    """Check an image where it lies (the build host's check, e.g. before packaging it);
    a node uses verified_copy instead."""
    want, key = judge(image, read_sidecars(image), insecure=insecure, trusted=trusted)
    if want is not None and (got := sha256_file(image)) != want:
        _mismatch(image, got, want, str(sums_path(image)))
    return Verdict("verified" if want else INSECURE, f"signed by {key}" if key else INSECURE)


# -- the verified copy ------------------------------------------------------------------

def _open_image(image: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(image, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        die(f"{image}: no such image", hint="give the .squashfs made by imgbase compose")
    except OSError as exc:
        die(f"cannot read {image}: {exc.strerror}", hint="check the path")
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        os.close(fd)
        die(f"{image} is not a regular file", hint="give the .squashfs made by imgbase compose")
    return fd, st


def _read_only_device(fd: int) -> bool:
    buf = fcntl.ioctl(fd, BLKROGET, struct.pack("i", 0))
    return bool(struct.unpack("i", buf)[0])


def _hash_fd(fd: int, out: int | None = None) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, CHUNK):
        h.update(chunk)
        if out is not None:
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
    return h.hexdigest()


def _copy_prefix(name: str) -> str:
    return f".{os.getpid()}.{name}."


def clear_stale(dest_dir: Path) -> None:
    """Remove the copies that processes no longer running left (an update cut short by a
    power loss): each copy is named after the pid that made it."""
    if not dest_dir.is_dir():
        return
    for entry in dest_dir.iterdir():
        pid = entry.name.split(".")[1] if entry.name.count(".") >= 2 else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            entry.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


def private_dir(path: Path) -> Path:
    """path as a directory only root reads: made 0700, or made so."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _copy_hashing(fd: int, size: int, dest_dir: Path, name: str) -> tuple[Path, str]:
    private_dir(dest_dir)
    free = shutil.disk_usage(dest_dir).free
    if size > free:
        die(f"{dest_dir} has {free >> 20} MiB free, the image's verified copy needs "
            f"{size >> 20} MiB", hint="free space on /var (imgbase gc; remove old downloads)")
    out_fd, tmp = tempfile.mkstemp(prefix=_copy_prefix(name), dir=dest_dir)
    try:
        got = _hash_fd(fd, out_fd)
        os.fsync(out_fd)
    except OSError as exc:
        os.unlink(tmp)
        die(f"cannot copy the image into {dest_dir}: {exc.strerror}",
            hint="free space on /var and try again")
    finally:
        os.close(out_fd)
    return Path(tmp), got


def verified_copy(image: str, *, insecure: bool, trusted: Path = TRUSTED,
                  dest_dir: Path = IMAGES, sums: Path | None = None,
                  config: Path = CONFIG, adopt: Path | None = None) -> Verified:
    """Check image's signature (small files, read once), then copy it into dest_dir
    hashing on the way, compare, and only then read its image.json -- from the copy.

    A read-only block device (the live environment's running image) is hashed in place:
    nothing can change it. adopt: a root-only directory (the downloads) whose files are
    renamed into dest_dir instead of copied."""
    check_insecure(insecure, config)
    if not os.path.lexists(image):  # said first: its sidecars are missing too
        die(f"{image}: no such image", hint="give the .squashfs made by imgbase compose")
    clear_stale(dest_dir)
    side = read_sidecars(image, sums)
    want, key = judge(image, side, insecure=insecure, trusted=trusted)
    fd, st = _open_image(image)
    try:
        name = Path(image).name
        if stat.S_ISBLK(st.st_mode):
            if not _read_only_device(fd):
                die(f"{image} is a writable block device", hint="give the image as a file")
            path, got, copy = Path(image), _hash_fd(fd), False
        elif adopt is not None and Path(image).resolve().parent == adopt.resolve():
            tmp_fd, tmp = tempfile.mkstemp(prefix=_copy_prefix(name), dir=private_dir(dest_dir))
            os.close(tmp_fd)
            path = Path(tmp)
            os.rename(image, path)  # same filesystem, both root-only: nobody else writes
            got, copy = _hash_fd(fd), True
        else:
            path, got = _copy_hashing(fd, st.st_size, dest_dir, name)
            copy = True
    finally:
        os.close(fd)
    result = Verified(path, "", key, "verified" if want else INSECURE, copy=copy)
    if want is not None and got != want:
        result.discard()
        _mismatch(image, got, want, side.sums_name)
    try:
        nvr, kernel_args = _identity(image, path)
    except BaseException:
        result.discard()
        raise
    return Verified(path, nvr, key, result.checksum, kernel_args, copy)


def _identity(image: str, copy: Path) -> tuple[str, tuple[str, ...]]:
    """The verified image's NVR (an LVM name: :meth:`Nvr.check_parts`) and kernel arguments
    (the GRUB entries file's gate), read from its copy, or the image is refused."""
    from .info import image_info

    try:
        info = image_info(str(copy))
        if not isinstance(info, dict) or not isinstance(info.get("nvr"), str):
            die("its image.json has no nvr", hint="use an image made by imgbase compose")
        nvr = Nvr.parse(info["nvr"])
        Nvr.check_parts(nvr.name, nvr.version, nvr.release)
        return str(nvr), check_args(info.get("kernel_args", []), "kernel_args")
    except ImageRefused:
        raise
    except InputError as exc:
        message = exc.message.replace(f"{copy}: ", "").replace(str(copy), image)
        refuse(f"{image}: {message}", hint=exc.hint)


# -- anti-rollback: the newest image this node has ever accepted ---------------------------

def read_accepted(path: Path | None = None) -> dict[str, str]:
    """Product name -> the newest NVR of it the node accepted (update, install)."""
    path = path or ACCEPTED
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        die(f"{path} is not the record of accepted images: {exc}",
            hint="restore it; it is what refuses older images (anti-rollback)")
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        die(f"{path} is not the record of accepted images",
            hint="restore it; it is what refuses older images (anti-rollback)")
    return data


def refuse_rollback(new: Nvr, accepted: dict[str, str], allow_downgrade: bool) -> None:
    """Refuse an image older than the newest of its product the node has accepted."""
    high = accepted.get(new.name)
    if high is not None and new < Nvr.parse(high) and not allow_downgrade:
        refuse(f"{new} is older than {high}, the newest image this node has accepted",
            hint="pass --allow-downgrade to go back anyway")


def accepted_step(accepted: dict[str, str], new: Nvr, path: Path | None = None) -> Step:
    """The plan step that raises the record to new (never lowers it); fsync'd."""
    path = path or ACCEPTED
    high = accepted.get(new.name)
    keep = high is not None and not Nvr.parse(high) < new
    record = {**accepted, new.name: high if keep and high else str(new)}
    return Step("accepted", write=(str(path), json.dumps(record, sort_keys=True) + "\n"),
                note="the newest image accepted: older ones are refused from now on")


def with_key(steps: list[Step], vg: str, nvr: str, key: str | None) -> list[Step]:
    """A new base's steps with its signing key tagged on it before it is sealed (so a
    complete base always carries it; status --json shows it). No key: unchanged."""
    if key is None:
        return steps
    tag = Step("base-key", ("lvchange", "--addtag", f"{KEY_TAG}{key}", f"{vg}/{nvr}"),
               note="the key that signed the image, on the base for good")
    at = next(i for i, s in enumerate(steps) if s.name == "base-deactivate")
    return [*steps[:at], tag, *steps[at:]]


def sign(image: str, *, key: str | None = None, homedir: str | None = None) -> Path:
    """Write IMAGE.sha256.sig, a detached signature of IMAGE.sha256, with gpg."""
    for path in (image, str(sums_path(image))):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            die(f"{path} is missing", hint="imgbase compose writes the image and its .sha256")
        if not stat.S_ISREG(mode):
            die(f"{path} is not a regular file", hint="sign an image made by imgbase compose")
    side = read_sidecars(image)
    if want_sha256(side) != sha256_file(image):
        die(f"{side.sums_name} does not match {image}", hint="compose the image again")
    out = sig_path(image)
    argv = ["gpg", "--batch", "--yes", "--detach-sign", "--output", str(out)]
    if homedir:
        argv[1:1] = ["--homedir", homedir]
    if key:
        argv += ["--local-user", key]
    run([*argv, str(sums_path(image))])
    return out
