"""imgbase and libvirt: one way in, libvirt-python (no ``virsh`` parsed as text).

:func:`connection` opens ``qemu:///system`` (read-only unless asked) and closes it; a
missing binding or a libvirt that does not answer is an ImgbaseError with libvirt's words.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..errors import ImgbaseError

URI = "qemu:///system"


@contextlib.contextmanager
def connection(uri: str = URI, read_only: bool = True) -> Iterator[Any]:
    try:
        import libvirt
    except ImportError as exc:
        raise ImgbaseError("python3-libvirt is not installed",
                           hint="apt install python3-libvirt") from exc
    try:
        conn = libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise ImgbaseError(f"libvirt ({uri}) did not answer: {exc}",
                           hint="is libvirtd running? (journalctl -u libvirtd)") from exc
    try:
        yield conn
    except libvirt.libvirtError as exc:
        raise ImgbaseError(f"libvirt ({uri}): {exc}",
                           hint="is libvirtd running? (journalctl -u libvirtd)") from exc
    finally:
        conn.close()


def offers_qemu(caps_xml: str) -> bool:
    """Whether the capabilities offer a qemu (TCG) or kvm domain.

    >>> offers_qemu("<capabilities><guest><arch name='x86_64'><domain type='qemu'/>"
    ...             "</arch></guest></capabilities>")
    True
    >>> offers_qemu("<capabilities/>")
    False
    """
    import xml.etree.ElementTree as ET

    types = {d.get("type") for d in ET.fromstring(caps_xml).findall("./guest/arch/domain")}
    return bool(types & {"qemu", "kvm"})
