"""Is this image the one its publisher signed?  Checksums, OpenPGP signatures, trusted keys.

An image travels with two small files: ``IMAGE.sha256`` (written by ``imgbase compose``)
and ``IMAGE.sha256.sig``, a detached OpenPGP signature of that checksum file
(``imgbase sign``). Signing the checksum rather than the image keeps verification to one
pass over the image. A node trusts the public keys it finds in ``/etc/imgbase/trusted.d/``
(``*.gpg``, binary keyrings as ``gpg --export`` writes them) and checks with ``gpgv``,
which takes its keys from nowhere else.

Without ``--insecure`` both files must be there and good; with it, missing files are
accepted (and said so), but a checksum that does not match or a signature that is bad is
still refused.

>>> parse_gpgv_status("[GNUPG:] NEWSIG\\n[GNUPG:] GOODSIG 0123ABCD test <t@x>\\n"
...                   "[GNUPG:] VALIDSIG AAAABBBB 2026-11-22 1 0 4 0 22 8 01 AAAABBBB\\n")
('good', 'AAAABBBB')
>>> parse_gpgv_status("[GNUPG:] ERRSIG 0123ABCD 22 8 00 1 9\\n[GNUPG:] NO_PUBKEY 0123ABCD\\n")
('no-key', '0123ABCD')
>>> parse_gpgv_status("[GNUPG:] BADSIG 0123ABCD test <t@x>\\n")
('bad', '0123ABCD')
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import die
from .run import run

TRUSTED = Path("/etc/imgbase/trusted.d")


@dataclass(frozen=True)
class Verdict:
    checksum: str  # "verified" | "missing (--insecure)"
    signature: str  # "signed by <fingerprint>" | "missing (--insecure)"


def sums_path(image: str) -> Path:
    return Path(f"{image}.sha256")


def sig_path(image: str) -> Path:
    return Path(f"{image}.sha256.sig")


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def verify_signature(sums: Path, sig: Path, trusted: Path = TRUSTED,
                     insecure: bool = False) -> str:
    """The signing key's fingerprint; die when the signature is not good and trusted."""
    rings = keyrings(trusted)
    if not rings:
        die(f"no trusted keys in {trusted}: the signature of {sums} cannot be checked",
            hint=f"put the publisher's key there (gpg --export KEY > {trusted}/site.gpg)"
            + ("" if insecure else ", or pass --insecure"))
    with tempfile.TemporaryDirectory(prefix="imgbase-gpgv.") as home:
        argv = ["gpgv", "--homedir", home, "--status-fd", "1"]
        for ring in rings:
            argv += ["--keyring", str(ring.resolve())]
        proc = run([*argv, str(sig), str(sums)], check=False)
    verdict, key = parse_gpgv_status(proc.stdout)
    if verdict == "good" and proc.returncode == 0:
        return key
    why = {"bad": f"is BAD (made by key {key}, but {sums} is not what it signed)",
           "no-key": f"was made by key {key}, which is not in {trusted}",
           "expired": f"was made by key {key}, which is expired or revoked"}.get(
               verdict, f"could not be checked: {proc.stderr.strip().splitlines()[-1:]}")
    die(f"the signature {sig} {why}",
        hint="get the image, its .sha256 and .sha256.sig from the publisher again")


def verify_image(image: str, *, insecure: bool, trusted: Path = TRUSTED) -> Verdict:
    """Signature of IMAGE.sha256 first (small), then the image's checksum against it (a
    pass over gigabytes, spent only on a signed image); refuse (die) unless both hold, or
    are missing and insecure."""
    sums, sig = sums_path(image), sig_path(image)
    if not sums.exists():
        if not insecure:
            die(f"{sums} is missing: the image cannot be verified",
                hint="put the .sha256 and .sha256.sig published with it next to it, "
                "or pass --insecure")
        if sig.exists():
            die(f"{sig} is there but {sums} is not", hint="get both from the publisher")
        return Verdict("missing (--insecure)", "missing (--insecure)")
    if sig.exists():
        signature = "signed by " + verify_signature(sums, sig, trusted, insecure)
    elif insecure:
        signature = "missing (--insecure)"
    else:
        die(f"{image} is not signed ({sig} is missing)",
            hint="sign it with imgbase sign, or pass --insecure to accept it unsigned")
    words = sums.read_text(errors="replace").split()
    want = words[0] if words else ""
    got = sha256_of(image)
    if got != want:
        die(f"{image}: sha256 {got[:16]}… does not match {sums} ({want[:16] or 'empty'}…)",
            hint="the image is corrupt or not the one published; download it again")
    return Verdict("verified", signature)


def sign(image: str, *, key: str | None = None, homedir: str | None = None) -> Path:
    """Write IMAGE.sha256.sig, a detached signature of IMAGE.sha256, with gpg."""
    sums = sums_path(image)
    if not sums.exists():
        die(f"{sums} is missing", hint="imgbase compose writes it next to the image")
    words = sums.read_text(errors="replace").split()
    if not words or words[0] != sha256_of(image):
        die(f"{sums} does not match {image}", hint="compose the image again")
    out = sig_path(image)
    argv = ["gpg", "--batch", "--yes", "--detach-sign", "--output", str(out)]
    if homedir:
        argv[1:1] = ["--homedir", homedir]
    if key:
        argv += ["--local-user", key]
    run([*argv, str(sums)])
    return out
