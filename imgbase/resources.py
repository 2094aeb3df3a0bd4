"""Where imgbase's data is: the layers, image definitions, kickstart templates and boot
assets. In a checkout ``imgbase/data/*`` are links to the repository's top-level
directories; a wheel carries them as package data, so an installed imgbase composes and
renders kickstarts without the repository.

>>> (IMAGES / "node.toml").is_file() and (KICKSTARTS / "node-thinp.ks.j2").is_file()
True
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
LAYERS = DATA / "layers"
IMAGES = DATA / "images"
KICKSTARTS = DATA / "kickstarts"
BOOT = DATA / "boot"
MAN = DATA / "man"  # the man pages (docs/imgbase.1, docs/imgbase-agent.8)
COMPLETIONS = DATA / "completions"  # bash and zsh (docs/completions, made by make docs)
#: what imgbase compose builds when no IMAGE.toml is given
DEFAULT_IMAGE = IMAGES / "node.toml"
