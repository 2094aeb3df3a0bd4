"""The boot self-check: the image's checks, run inside a booted node.

``imgbase selfcheck`` prints one line per check and exits non-zero if any
fails. With ``--poweroff`` (the imgbase-selfcheck unit, asked for on the kernel
command line) it then ends the boot: under qemu with an ``isa-debug-exit``
device the result becomes qemu's exit status (see imgbase.vm), elsewhere the
node powers off.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import platform
import termios
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImgbaseError
from . import systemd, virt

DEBUG_EXIT_PORT = 0x501
PASS_CODE, FAIL_CODE = 0x10, 0x11  # qemu exits with (code << 1) | 1: 33 and 35
IMAGE_JSON = Path("/usr/lib/imgbase/image.json")


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


def check_system_running() -> CheckResult:
    state = systemd.wait_system_running(timeout=600)
    if state == "running":
        return CheckResult("system-running", True, state)
    units = " ".join(systemd.failed_units())
    return CheckResult("system-running", False, f"{state}; failed units: {units or 'none'}")


def check_libvirt() -> CheckResult:
    with virt.connection() as conn:
        ok = virt.offers_qemu(conn.getCapabilities())
    return CheckResult("libvirt", ok, "qemu domain type offered" if ok
                       else "libvirt offers no qemu domain type")


def check_machine_id() -> CheckResult:
    mid = Path("/etc/machine-id").read_text().strip()
    return CheckResult("machine-id", len(mid) == 32, mid or "empty")


def check_ssh_host_keys() -> CheckResult:
    keys = sorted(p.name for p in Path("/etc/ssh").glob("ssh_host_*_key"))
    return CheckResult("ssh-host-keys", bool(keys), " ".join(keys) or "none")


def check_image() -> CheckResult:
    try:
        nvr = json.loads(IMAGE_JSON.read_text())["nvr"]
    except (OSError, ValueError, KeyError) as exc:
        return CheckResult("image", False, str(exc))
    return CheckResult("image", True, nvr)


CHECKS: list[Callable[[], CheckResult]] = [
    check_system_running, check_image, check_machine_id, check_ssh_host_keys, check_libvirt,
]


def run_checks() -> list[CheckResult]:
    results = []
    for check in CHECKS:
        try:
            results.append(check())
        except Exception as exc:  # a check that crashes has failed, with its reason
            detail = exc.oneline() if isinstance(exc, ImgbaseError) else repr(exc)
            results.append(CheckResult(check.__name__.removeprefix("check_"), False, detail))
    return results


def _under_qemu_x86() -> bool:
    try:
        vendor = Path("/sys/class/dmi/id/sys_vendor").read_text().strip()
    except OSError:
        return False
    return platform.machine() == "x86_64" and vendor == "QEMU"


def debug_exit(code: int) -> None:
    """Write ``code`` to qemu's isa-debug-exit port: qemu exits with (code << 1) | 1.

    The kernel has no /dev/port here (CONFIG_DEVPORT is off in Debian's cloud
    kernel), so this takes the port with ioperm(2) and runs the three-instruction
    ``out`` from an executable page (CAP_SYS_RAWIO, i.e. root).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ioperm(DEBUG_EXIT_PORT, 1, 1) != 0:
        raise OSError(ctypes.get_errno(), "ioperm")
    # mov dx, 0x501 ; mov al, code ; out dx, al ; ret
    machine_code = bytes([0x66, 0xBA, DEBUG_EXIT_PORT & 0xFF, DEBUG_EXIT_PORT >> 8,
                          0xB0, code & 0xFF, 0xEE, 0xC3])
    page = mmap.mmap(-1, mmap.PAGESIZE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(machine_code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    ctypes.CFUNCTYPE(None)(address)()


def end_boot(ok: bool) -> None:
    """Under qemu, exit with the result as qemu's status; elsewhere just power off."""
    if _under_qemu_x86():
        try:
            debug_exit(PASS_CODE if ok else FAIL_CODE)
        except OSError as exc:
            print(f"IMGBASE-SELFCHECK debug-exit unavailable: {exc}", flush=True)
    try:
        systemd.power_off()
    except ImgbaseError as exc:
        print(f"IMGBASE-SELFCHECK power-off: {exc.oneline()}", flush=True)


def report_to_console(lines: list[str]) -> None:
    """Write straight to the console and wait until it is sent: qemu exits the moment
    the result reaches isa-debug-exit, and output still queued in journald or the tty
    would be lost from the serial log."""
    try:
        with open("/dev/console", "w") as console:
            console.write("\n".join(lines) + "\n")
            console.flush()
            with contextlib.suppress(termios.error):
                termios.tcdrain(console.fileno())
    except OSError:
        pass


def main(poweroff: bool) -> int:
    results = run_checks()
    lines = [f"IMGBASE-SELFCHECK {r.name} {'ok' if r.ok else 'FAIL'} {r.detail}"
             for r in results]
    ok = all(r.ok for r in results)
    lines.append(f"IMGBASE-SELFCHECK-RESULT {'pass' if ok else 'fail'}")
    print("\n".join(lines), flush=True)
    if poweroff:
        report_to_console(lines)
        os.sync()
        end_boot(ok)
    return 0 if ok else 1
