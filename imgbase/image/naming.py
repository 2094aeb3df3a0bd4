"""Names of images, bases and layers, and their ordering.

An image is named by its NVR, ``<name>-<version>-<release>``; its base LV carries
that name and its layers are ``<nvr>+<n>``.

>>> nvr = Nvr.parse("imgbase-node-1.0-1")
>>> nvr.name, nvr.version, nvr.release
('imgbase-node', '1.0', '1')
>>> str(nvr)
'imgbase-node-1.0-1'
>>> Layer.parse("imgbase-node-1.0-1+2")
Layer(nvr=Nvr(name='imgbase-node', version='1.0', release='1'), index=2)
>>> sorted(["node-1.10-1", "node-1.9-1", "node-1.9-2"], key=Nvr.parse)
['node-1.9-1', 'node-1.9-2', 'node-1.10-1']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from ..errors import ImgbaseError, die

_NAME = r"[A-Za-z0-9][A-Za-z0-9._]*(?:-[A-Za-z0-9._]*[A-Za-z_][A-Za-z0-9._]*)*"
_FIELD = r"[A-Za-z0-9][A-Za-z0-9._~]*"
_NVR_RE = re.compile(rf"^(?P<name>{_NAME})-(?P<version>{_FIELD})-(?P<release>{_FIELD})$")
_SEGMENT = re.compile(r"\d+|[A-Za-z]+|~")
#: An image's NVR names its base LV, and ``<nvr>+<n>`` its layers. LVM takes at most 127
#: characters of ``[A-Za-z0-9+_.-]`` in a name, and device-mapper's ``<vg>-<lv>`` (each
#: '-' doubled) at most 127 as well: an NVR of 64 leaves room for both.
MAX_NVR = 64
#: what LVM refuses in an LV name (its own sub-volumes' suffixes)
LVM_RESERVED = ("_cdata", "_cmeta", "_corig", "_iorig", "_mimage", "_mlog", "_pmspare",
                "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin")


def vercmp(a: str, b: str) -> int:
    """Compare two version strings segment by segment, rpm style.

    Digits compare numerically, letters lexically, a numeric segment is newer
    than an alphabetic one, and ``~`` sorts before anything (pre-releases).

    >>> vercmp("1.10", "1.9"), vercmp("1.0", "1.0"), vercmp("1.0~rc1", "1.0")
    (1, 0, -1)
    >>> vercmp("2a", "2"), vercmp("1.0.1", "1.0"), vercmp("1a", "10")
    (1, 1, -1)
    """
    sa, sb = _SEGMENT.findall(a), _SEGMENT.findall(b)
    for x, y in zip(sa, sb, strict=False):
        if x == y:
            continue
        if x == "~" or y == "~":
            return -1 if x == "~" else 1
        if x.isdigit() and y.isdigit():
            return (int(x) > int(y)) - (int(x) < int(y))
        if x.isdigit() != y.isdigit():
            return 1 if x.isdigit() else -1
        return int(x > y) - int(x < y)
    if len(sa) == len(sb):
        return 0
    longer, sign = (sa, 1) if len(sa) > len(sb) else (sb, -1)
    nxt = longer[min(len(sa), len(sb))]
    return -sign if nxt == "~" else sign


@total_ordering
@dataclass(frozen=True)
class Nvr:
    name: str
    version: str
    release: str

    @classmethod
    def parse(cls, text: str) -> Nvr:
        """Parse ``name-version-release``; the name may itself contain dashes.

        >>> Nvr.parse("node")
        Traceback (most recent call last):
        ...
        imgbase.errors.InputError: 'node' is not a name-version-release (NVR)
        """
        m = _NVR_RE.fullmatch(text)  # $ alone would take a trailing newline
        if not m:
            die(
                f"{text!r} is not a name-version-release (NVR)",
                hint="an NVR looks like imgbase-node-1.0-1",
            )
        return cls(m["name"], m["version"], m["release"])

    @classmethod
    def check_parts(cls, name: str, version: str, release: str) -> Nvr:
        """Build an NVR from parts (an image being composed), refusing parts that would
        not parse back or that LVM would not take as a name (:data:`MAX_NVR`).

        >>> Nvr.check_parts("node", "1-0", "1")
        Traceback (most recent call last):
        ...
        imgbase.errors.InputError: 'node-1-0-1' is not a name-version-release (NVR)
        >>> Nvr.check_parts("node", "1" * 70, "1")
        Traceback (most recent call last):
        ...
        imgbase.errors.InputError: the NVR 'node-111...-1' has 77 characters, more than 64
        """
        text = f"{name}-{version}-{release}"
        if len(text) > MAX_NVR:
            die(f"the NVR {text[:8] + '...' + text[-2:]!r} has {len(text)} characters, "
                f"more than {MAX_NVR}",
                hint="its layers are LVM volumes <nvr>+<n>, and LVM names stop at 127")
        nvr = cls.parse(text)
        if nvr != cls(name, version, release):
            die(f"{text!r} is not a name-version-release (NVR)",
                hint="version and release may not contain '-'")
        if "~" in text or any(r in text for r in LVM_RESERVED):
            die(f"{text!r} cannot name an LVM volume",
                hint=f"no '~' and none of {', '.join(LVM_RESERVED)}")
        return nvr

    def __str__(self) -> str:
        return f"{self.name}-{self.version}-{self.release}"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Nvr):
            return NotImplemented
        if self.name != other.name:
            return self.name < other.name
        c = vercmp(self.version, other.version) or vercmp(self.release, other.release)
        return c < 0


@dataclass(frozen=True)
class Layer:
    nvr: Nvr
    index: int

    @classmethod
    def parse(cls, text: str) -> Layer:
        """Parse ``<nvr>+<n>``.

        >>> str(Layer.parse("node-2.0-1+1"))
        'node-2.0-1+1'
        >>> Layer.parse("node-2.0-1")
        Traceback (most recent call last):
        ...
        imgbase.errors.InputError: 'node-2.0-1' is not a layer name (<nvr>+<n>)
        """
        base, sep, index = text.rpartition("+")
        if not sep or not index.isdigit():
            die(f"{text!r} is not a layer name (<nvr>+<n>)", hint="a layer looks like node-1.0-1+1")
        return cls(Nvr.parse(base), int(index))

    def __str__(self) -> str:
        return f"{self.nvr}+{self.index}"

def layer_key(name: str) -> tuple[int, object]:
    """Sort key: layers by NVR then index; names that do not parse last."""
    try:
        layer = Layer.parse(name)
    except ImgbaseError:
        return (1, name)
    return (0, (layer.nvr, layer.index))
