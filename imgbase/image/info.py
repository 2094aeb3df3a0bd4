"""What an image says of itself: its ``/usr/lib/imgbase/image.json``, read from the
squashfs without mounting it. Only for an image that was verified first (trust)."""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import die
from . import squashfs


def image_info(image: str) -> dict[str, Any]:
    if not os.path.exists(image):
        die(f"{image}: no such image", hint="give the .squashfs made by imgbase compose")
    if squashfs.readable(image).returncode != 0:
        die(f"{image} is not a readable squashfs (truncated or corrupt?)",
            hint="download it again and check it against its .sha256")
    text = squashfs.cat(image, "usr/lib/imgbase/image.json")
    if text is None:
        die(f"{image} is not an imgbase image (no /usr/lib/imgbase/image.json)",
            hint="use an image made by imgbase compose")
    try:
        info: dict[str, Any] = json.loads(text)
    except ValueError as exc:
        die(f"{image}: its image.json is not JSON ({exc})",
            hint="use an image made by imgbase compose")
    return info
