"""How `Guest` tells a guest's reset from its power-off: qemu's QMP SHUTDOWN events."""

from __future__ import annotations

import socket
import subprocess

from imgbase.vm import _qmp_connect, _read_shutdowns


def test_shutdown_reasons_are_read_until_qemu_closes_the_socket() -> None:
    ours, qemus = socket.socketpair()
    qemus.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n'
                  b'{"return": {}}\n'
                  b'{"event": "RTC_CHANGE", "data": {"offset": 0}}\n'
                  b'not json at all\n'
                  b'{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-reset"}}\n')
    qemus.close()
    reasons: list[str] = []
    _read_shutdowns(ours, reasons)
    assert reasons == ["guest-reset"]


def test_no_qmp_connection_to_a_qemu_that_died() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert _qmp_connect("imgbase-qmp-test-nobody-listens", dead) is None
