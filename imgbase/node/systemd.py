"""imgbase and systemd: readiness over $NOTIFY_SOCKET; unit states, the system's state,
failed units, reboot and power-off over D-Bus.

No ``systemctl`` in imgbase (the agent, health, selfcheck): unit states come from
org.freedesktop.systemd1 and reboots and power-off go through logind
(org.freedesktop.login1), both with dbus-python; readiness and status lines are sd_notify
datagrams, written here with a plain socket.

>>> notify("READY=1", socket_path=None)
False
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from ..errors import ImgbaseError

SYSTEMD, SYSTEMD_PATH = "org.freedesktop.systemd1", "/org/freedesktop/systemd1"
LOGIND, LOGIND_PATH = "org.freedesktop.login1", "/org/freedesktop/login1"


def notify(message: str, socket_path: str | None = "") -> bool:
    """Send an sd_notify message (READY=1, STATUS=..., STOPPING=1); False outside systemd.

    socket_path "" means: $NOTIFY_SOCKET. An abstract socket starts with "@"."""
    path = os.environ.get("NOTIFY_SOCKET", "") if socket_path == "" else socket_path
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


def _bus() -> Any:
    try:
        import dbus
    except ImportError as exc:
        raise ImgbaseError("python3-dbus is not installed", hint="apt install python3-dbus"
                           ) from exc
    try:
        return dbus.SystemBus()
    except dbus.DBusException as exc:
        raise ImgbaseError(f"no system D-Bus: {exc}", hint="is dbus running?") from exc


def unit_state(name: str) -> dict[str, str]:
    """ActiveState, SubState and Result of a unit ("inactive"/"dead" when not loaded)."""
    import dbus

    bus = _bus()
    manager = dbus.Interface(bus.get_object(SYSTEMD, SYSTEMD_PATH),
                             f"{SYSTEMD}.Manager")
    try:
        path = manager.LoadUnit(name)
    except dbus.DBusException as exc:
        raise ImgbaseError(f"systemd does not know {name}: {exc}",
                           hint="check the unit name") from exc
    props = dbus.Interface(bus.get_object(SYSTEMD, path), "org.freedesktop.DBus.Properties")
    get = props.Get
    unit = f"{SYSTEMD}.Unit"
    state = {"active": str(get(unit, "ActiveState")), "sub": str(get(unit, "SubState")),
             "load": str(get(unit, "LoadState"))}
    if name.endswith(".service") and state["load"] == "loaded":
        state["result"] = str(get(f"{SYSTEMD}.Service", "Result"))
    return state


def _manager() -> Any:
    import dbus

    return dbus.Interface(_bus().get_object(SYSTEMD, SYSTEMD_PATH), f"{SYSTEMD}.Manager")


def system_state() -> str:
    """What ``systemctl is-system-running`` says: initializing, starting, running,
    degraded, maintenance, stopping."""
    import dbus

    props = dbus.Interface(_bus().get_object(SYSTEMD, SYSTEMD_PATH),
                           "org.freedesktop.DBus.Properties")
    return str(props.Get(f"{SYSTEMD}.Manager", "SystemState"))


def wait_system_running(timeout: float, poll: float = 1.0) -> str:
    """The system's state once the boot is over (not initializing or starting), or the
    state it was still in after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        state = system_state()
        if state not in ("initializing", "starting") or time.monotonic() >= deadline:
            return state
        time.sleep(poll)


def failed_units() -> list[str]:
    """The units in the failed state, by name (``systemctl --failed``)."""
    return sorted(str(u[0]) for u in _manager().ListUnitsFiltered(["failed"]))


def _logind(method: str, what: str) -> None:
    import dbus

    manager = dbus.Interface(_bus().get_object(LOGIND, LOGIND_PATH), f"{LOGIND}.Manager")
    try:
        getattr(manager, method)(False)
    except dbus.DBusException as exc:
        raise ImgbaseError(f"logind refused the {what}: {exc}",
                           hint="is systemd-logind running?") from exc


def reboot() -> None:
    """Ask logind for a reboot (it runs the shutdown: units stop, domains get their turn)."""
    _logind("Reboot", "reboot")


def power_off() -> None:
    """Ask logind to power the machine off."""
    _logind("PowerOff", "power-off")
