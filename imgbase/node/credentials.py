"""Boot-time provisioning from system credentials (e.g. SMBIOS type 11)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def merge_authorized_keys(source: Path, home: Path = Path("/root")) -> int:
    """Add the keys in ``source`` to ``home/.ssh/authorized_keys``; return how many were new.

    Keys already present (an admin's own) are kept; nothing is removed.
    """
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    target = ssh / "authorized_keys"
    have = target.read_text().splitlines() if target.exists() else []
    new = [k for k in source.read_text().splitlines() if k.strip() and k not in have]
    if new:
        tmp = target.with_name(".authorized_keys.tmp")
        tmp.write_text("\n".join(have + new) + "\n")
        tmp.chmod(0o600)
        os.replace(tmp, target)
    return len(new)


def main(argv: list[str]) -> int:
    """``python3 -I -m imgbase.node.credentials FILE``: what imgbase-ssh-credential.service runs
    at boot, before sshd, without the CLI's imports (seconds under emulation)."""
    if len(argv) != 1:
        print("usage: python3 -m imgbase.node.credentials AUTHORIZED_KEYS_FILE", file=sys.stderr)
        return 2
    print(f"{merge_authorized_keys(Path(argv[0]))} SSH key(s) added for root")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
