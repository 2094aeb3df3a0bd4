"""Entry point of ``imgbase-agent``.

The cluster agent itself (etcd membership, libvirt capabilities, fleet updates)
arrives with its own issue; until then the command reports its version and says
plainly that it has nothing to run, with a non-zero exit for ``run``.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgbase-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"imgbase-agent {__version__}")
    parser.add_argument("command", nargs="?", choices=["run"], default="run")
    parser.parse_args(argv)
    print("imgbase-agent: the cluster agent is not implemented in this version", file=sys.stderr)
    return 1
