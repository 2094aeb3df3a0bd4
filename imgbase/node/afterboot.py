"""After each boot (``imgbase health``, imgbase-health.service): the health checks, the
history, the verdict of :func:`imgbase.node.boot.assess` written to grubenv, and -- when
asked to act -- the reboot that counts a failed trial down, or gc once a new layer has
proved itself.

:func:`check` does the first part and returns an :class:`Outcome` for the caller to print;
:func:`act` the second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import CONFIG, HealthSettings, load
from ..errors import ImgbaseError
from ..plan import execute, locked
from ..progress import Progress
from . import boot, gc, health, systemd
from .facts import NodeFacts

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class Outcome:
    booted: str | None
    record: dict[str, Any]  # the history record of this check: good, reason, checks
    results: list[health.CheckResult]
    events: list[dict[str, Any]]  # what the verdict did: marked-good, abandoned, ...
    reboot: bool  # on trial and not healthy: a reboot counts the try down
    env_kept: bool  # False: grubenv changed while the checks ran and was left as it is

    @property
    def good(self) -> bool:
        return bool(self.record["good"])


def check(settings: HealthSettings) -> Outcome:
    """Run the checks, record them, and write the verdict's grubenv (over the grubenv it
    was made from, under the lock)."""
    results = health.run_checks(settings)
    facts = NodeFacts.gather()
    boot_id = BOOT_ID.read_text().strip()
    rec = health.record(facts.booted, boot_id, results)
    health.append_history(rec)
    verdict = boot.assess(facts.env, facts.booted, rec["good"], rec["reason"],
                          health.read_history())
    for event in verdict.events:
        health.append_history({"time": rec["time"], "boot_id": boot_id, **event})
    kept = verdict.env == facts.env or health.write_env(facts, facts.env, verdict.env)
    return Outcome(facts.booted, rec, results, verdict.events, verdict.reboot, kept)


def act(outcome: Outcome, say: Callable[[str], None], config: Path = CONFIG) -> None:
    """Reboot a failed trial, or collect old images after a good one ([gc] of config);
    ``say`` is told first what is done. A failing gc -- a bad [gc] included -- is said,
    never turned into a red health result."""
    if outcome.reboot:
        say("on trial and not healthy: rebooting to count the try down")
        systemd.reboot()
        return
    if not any(e["event"] == "marked-good" for e in outcome.events):
        return
    try:
        settings = load(config, only=("gc",)).gc
        if not settings.after_good_boot:
            return
        plan = gc.plan_gc(NodeFacts.gather(), settings.keep, health.read_history())
        if plan.steps:
            with locked():
                execute(plan, Progress())
    except ImgbaseError as exc:
        say(f"gc after a good boot failed: {exc.oneline()}")
        return
    removed = [s.name.removeprefix("remove-") for s in plan.steps
               if s.name.startswith("remove-") and "+" not in s.name]
    health.append_history({"time": outcome.record["time"],
                           "boot_id": outcome.record["boot_id"], "event": "gc",
                           "removed": removed})
