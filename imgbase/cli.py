"""The ``imgbase`` command: argparse dispatcher, one function per verb."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import EXIT_INTERRUPTED, ImgbaseError
from .progress import Progress


def cmd_compose(args: argparse.Namespace) -> int:
    from .compose.build import DEFAULT_CACHE, compose_image
    from .spec import load_image

    overrides = {k: v for k, v in (("version", args.image_version),
                                   ("release", args.release)) if v is not None}
    image = load_image(Path(args.image), overrides=overrides)
    progress = Progress(json_lines=args.json)
    compose_image(image, Path(args.output), progress=progress,
                  cache=Path(args.cache) if args.cache else DEFAULT_CACHE, rebuild=args.rebuild)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from .compose.build import explain_diff

    names = explain_diff(Path(args.a), Path(args.b))
    if args.json:
        print(json.dumps({"differing": names}))
    else:
        print("\n".join(names) if names else "identical contents")
    return 1 if names else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgbase", description="Image-based hypervisor nodes on LVM thin pools.")
    parser.add_argument("--version", action="version", version=f"imgbase {__version__}")
    parser.add_argument("--debug", action="store_true", help="log every command run")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = sub.add_parser("compose", help="build a squashfs node image from layers",
                       description="Build <name>-<version>-<release>.squashfs, .manifest.json "
                       "and .sha256 from an image definition and its layers.")
    p.add_argument("image", metavar="IMAGE.toml", help="image definition, e.g. images/node.toml")
    p.add_argument("-o", "--output", default="out", help="output directory (default: out)")
    p.add_argument("--cache",
                   help="cache directory (default: $IMGBASE_CACHE or /var/cache/imgbase)")
    p.add_argument("--rebuild", action="store_true", help="build even if a cached image matches")
    p.add_argument("--version", dest="image_version", help="override the image version")
    p.add_argument("--release", help="override the image release")
    p.add_argument("--json", action="store_true", help="one JSON event per line on stdout")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("diff", help="name the files that differ between two images",
                       description="Compare two squashfs images file by file (contents, "
                       "mode, owner, mtime); exit 1 when they differ.")
    p.add_argument("a", metavar="A.squashfs")
    p.add_argument("b", metavar="B.squashfs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_diff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ImgbaseError as exc:
        print(f"imgbase: error: {exc.oneline()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("imgbase: interrupted; nothing was published", file=sys.stderr)
        return EXIT_INTERRUPTED
