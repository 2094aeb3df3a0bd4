"""`imgbase-health` (``imgbase health``): is this boot good? Two tiers of checks.

*Required* checks decide: all green marks the boot good (the boot counter is
cleared); one red on a layer still on trial reboots, so the bootloader counts
the try down and, when none are left, falls back to the previous good layer.
*Wanted* checks are reported, never acted on.

Checks are built-ins plus executables in ``/etc/imgbase/health.d/{required,wanted}/``
(run in name order; exit 0 is green; stdout/stderr's last line is the reason).
Every check has a timeout (``[health] timeout`` in /etc/imgbase/imgbase.toml,
default 60 s); a check that times out is red.

Results are appended to ``/var/lib/imgbase/health.json`` (on the shared /var, so
the layer that falls back can still read why the other one failed). The grubenv the
verdict calls for is written like every other grubenv write: under imgbase's lock
(:func:`write_env` waits for it a while), to a mounted /boot, and only over the grubenv
the verdict was made from.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import HealthSettings
from ..errors import ImgbaseError, InputError
from ..plan import LOCK, locked
from . import systemd, virt

if TYPE_CHECKING:
    from .facts import NodeFacts

HEALTH_D = Path("/etc/imgbase/health.d")
HISTORY = Path("/var/lib/imgbase/health.json")
HISTORY_KEEP = 50
LOCK_WAIT = 120.0  # seconds health waits for another imgbase command to finish


@dataclass(frozen=True)
class CheckResult:
    name: str
    tier: str  # "required" | "wanted"
    ok: bool
    reason: str
    seconds: float


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def run_command(name: str, tier: str, argv: list[str], timeout: float) -> CheckResult:
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return CheckResult(name, tier, False, f"timed out after {timeout:g} s",
                           round(time.monotonic() - t0, 2))
    except OSError as exc:
        return CheckResult(name, tier, False, f"cannot run: {exc}", 0.0)
    reason = _last_line(proc.stdout + "\n" + proc.stderr) or f"exit status {proc.returncode}"
    return CheckResult(name, tier, proc.returncode == 0,
                       reason if proc.returncode else (reason or "ok"),
                       round(time.monotonic() - t0, 2))


def run_call(name: str, tier: str, call: Callable[[], tuple[bool, str]],
             timeout: float) -> CheckResult:
    """A built-in check, in-process (D-Bus, libvirt), with the same timeout as a command: it
    runs in a thread of its own, and one that has not answered in time has failed."""
    t0 = time.monotonic()
    answer: list[tuple[bool, str]] = []

    def target() -> None:
        try:
            answer.append(call())
        except Exception as exc:  # a check that breaks has failed, with its reason
            message = exc.oneline() if isinstance(exc, ImgbaseError) else f"{exc}"
            answer.append((False, message))

    thread = threading.Thread(target=target, name=f"health-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    seconds = round(time.monotonic() - t0, 2)
    if not answer:
        return CheckResult(name, tier, False, f"timed out after {timeout:g} s", seconds)
    ok, reason = answer[0]
    return CheckResult(name, tier, ok, reason, seconds)


def units_not_failed(units: tuple[str, ...]) -> tuple[bool, str]:
    """The required units: none in the failed state (``systemctl is-failed``)."""
    bad = [u for u in units if systemd.unit_state(u)["active"] == "failed"]
    return (not bad, f"failed units: {' '.join(bad)}" if bad else "ok")


def libvirt_answers() -> tuple[bool, str]:
    with virt.connection() as conn:
        return True, str(conn.getURI())


def no_failed_units() -> tuple[bool, str]:
    """Not ``is-system-running --wait``: this check runs as part of the boot it would wait
    for."""
    failed = systemd.failed_units()
    return (not failed, f"failed: {' '.join(failed)}" if failed else "ok")


def builtin_checks(config: HealthSettings) -> list[tuple[str, str, Callable[[], tuple[bool, str]]]]:
    """(name, tier, call) of the built-in checks."""
    return [
        ("units", "required", lambda: units_not_failed(config.required_units)),
        ("libvirt", "required", libvirt_answers),
        ("failed-units", "wanted", no_failed_units),
    ]


def command_checks(root: Path = HEALTH_D) -> list[tuple[str, str, list[str]]]:
    """(name, tier, argv) of the checks that are commands: the agent's own answer, and
    the drop-ins of health.d."""
    agent = [("agent-registered", "wanted", ["imgbase-agent", "registered"])]
    return [*(agent if agent_configured() else []), *directory_checks(root)]


def agent_configured(config: Path | None = None, cmdline: Path | None = None) -> bool:
    """A node meant to be in a cluster wants its agent registered (a wanted check)."""
    from . import agentconfig as agent_config

    config, cmdline = config or agent_config.CONFIG, cmdline or agent_config.CMDLINE
    line = cmdline.read_text() if cmdline.exists() else ""
    return config.exists() or "imgbase.agent.endpoints=" in line


def directory_checks(root: Path = HEALTH_D) -> list[tuple[str, str, list[str]]]:
    found = []
    for tier in ("required", "wanted"):
        d = root / tier
        if d.is_dir():
            for path in sorted(d.iterdir()):
                if path.is_file() and os.access(path, os.X_OK):
                    found.append((f"{tier}/{path.name}", tier, [str(path)]))
    return found


def run_checks(config: HealthSettings, root: Path = HEALTH_D) -> list[CheckResult]:
    return [*(run_call(name, tier, call, config.timeout)
              for name, tier, call in builtin_checks(config)),
            *(run_command(name, tier, argv, config.timeout)
              for name, tier, argv in command_checks(root))]


def verdict(results: list[CheckResult]) -> tuple[bool, str]:
    """Good when every required check is green; the reason names the red ones.

    >>> verdict([CheckResult("a", "required", True, "ok", 0),
    ...          CheckResult("b", "wanted", False, "slow", 0)])
    (True, 'all required checks passed')
    >>> verdict([CheckResult("a", "required", False, "libvirtd down", 0)])
    (False, 'a: libvirtd down')
    """
    red = [r for r in results if r.tier == "required" and not r.ok]
    if not red:
        return True, "all required checks passed"
    return False, "; ".join(f"{r.name}: {r.reason}" for r in red)


def read_history(path: Path = HISTORY) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return data if isinstance(data, list) else []


def append_history(record: dict[str, Any], path: Path = HISTORY) -> None:
    from ..plan import write_atomic

    history = [*read_history(path), record][-HISTORY_KEEP:]
    write_atomic(path, json.dumps(history, indent=1) + "\n")


def record(layer: str | None, boot_id: str, results: list[CheckResult]) -> dict[str, Any]:
    good, reason = verdict(results)
    return {"time": round(time.time()), "event": "health", "layer": layer, "boot_id": boot_id,
            "good": good, "reason": reason, "checks": [asdict(r) for r in results]}


@contextlib.contextmanager
def waiting_locked(path: Path = LOCK, wait: float = LOCK_WAIT) -> Iterator[None]:
    """imgbase's lock, waited for up to wait seconds (health runs at boot, when the agent
    may be busy); then refused as any second command is."""
    deadline = time.monotonic() + wait
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(locked(path))
                break
            except InputError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
        yield


def write_env(f: NodeFacts, seen: dict[str, str], env: dict[str, str],
              lock: Path = LOCK, wait: float = LOCK_WAIT) -> bool:
    """Write grubenv as the verdict says, under the lock, then commit /boot for GRUB.

    False, nothing written, when grubenv is no longer ``seen`` (the one the verdict was
    made from): a command that changed it meanwhile (the agent's boot --set-default) wins.
    Refused when /boot is not mounted."""
    from ..bootloader import commit_argv, grubenv
    from ..plan import write_atomic
    from ..run import run

    f.need_boot()
    path = f.boot / "grub/grubenv"
    block = grubenv.render(env)
    with waiting_locked(lock, wait):
        if grubenv.read(path) != seen:
            return False
        write_atomic(path, block)
        run(list(commit_argv(f.boot)))  # so that GRUB reads it, too
    return True
