"""The real node under the agent: imgbase's own state, `imgbase update`, libvirt, logind."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..errors import EXIT_REFUSED, ImgbaseError
from ..image.naming import Layer
from ..node.update import EXIT_UP_TO_DATE
from ..run import run
from .core import NodeState, StageRefused

log = logging.getLogger("imgbase.agent")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
DRAIN_POLL = 10.0


def _nvr_of(layer: str | None) -> str | None:
    if not layer:
        return None
    try:
        return str(Layer.parse(layer).nvr)
    except ImgbaseError:
        return None


class HostNode:
    """A Node (see :mod:`imgbase.agent.core`) that is this machine."""

    def __init__(self, migrate_hook: str | None = None) -> None:
        self.migrate_hook = migrate_hook
        self.capabilities: dict[str, Any] = {}
        self.boot_id = BOOT_ID.read_text().strip() if BOOT_ID.exists() else ""

    def _libvirt(self) -> dict[str, Any]:
        from .capabilities import collect

        try:
            self.capabilities = collect()
        except ImgbaseError as exc:
            log.warning("capabilities: %s", exc.message)
            self.capabilities = {"error": exc.message, **{
                k: v for k, v in self.capabilities.items() if k != "error"}}
        return self.capabilities

    def state(self) -> NodeState:
        from ..node.facts import NodeFacts
        from ..node.health import read_history
        from ..node.keep import rolled_back_from
        from ..storage.layout import TAG_INCOMPLETE

        facts = NodeFacts.gather()
        history = read_history()
        this_boot = [h for h in history if h.get("boot_id") == self.boot_id]
        health = [h for h in this_boot if h.get("event") == "health"]
        # layers GRUB or the health gate gave up on, and those the admin rolled back from:
        # the agent does not roll the node forward to them again
        left = [h.get("layer") for h in history if h.get("event") == "abandoned"]
        left += sorted(rolled_back_from(history))
        abandoned = tuple(n for layer in left if (n := _nvr_of(layer)))
        booted = _nvr_of(facts.booted)
        # GRUB fell back when the tries ran out and the fallback is what runs -- whether or
        # not the health gate has rewritten grubenv yet
        env = facts.env
        fell_back = (_nvr_of(env.get("saved_entry")) if env.get("imgbase_tries") == "0"
                     and facts.booted and facts.booted == env.get("imgbase_fallback") else None)
        fell_back = fell_back or next((_nvr_of(h.get("layer")) for h in reversed(this_boot)
                                       if h.get("event") == "abandoned"), None)
        ready = sorted(
            (lv for lv in facts.layout.layers
             if lv.name != facts.booted and lv.name in facts.entries
             and TAG_INCOMPLETE not in lv.tags and _nvr_of(lv.name) not in abandoned
             and _nvr_of(lv.name) != booted),
            key=lambda lv: Layer.parse(lv.name).nvr)
        caps = self._libvirt()
        return NodeState(
            booted_nvr=booted,
            staged_nvr=_nvr_of(ready[-1].name) if ready else None,
            healthy=bool(health[-1].get("good")) if health else None,
            fell_back_from=fell_back,
            running_domains=int(caps.get("running_domains", 0)),
            capabilities=caps, layer=facts.booted, abandoned=abandoned)

    def stage(self, url: str, nvr: str) -> None:
        """imgbase recover (an update cut short is cleaned first), then imgbase update
        --stage-only: the default is switched at the reboot, when the slot is ours."""
        from ..plan import JOURNAL

        if JOURNAL.exists():
            run(["imgbase", "recover"], check=False)
        log.info("staging %s from %s", nvr, url)
        proc = run(["imgbase", "update", "--stage-only", "--", url], check=False)
        if proc.returncode in (0, EXIT_UP_TO_DATE):  # 77: the image is already here
            return
        last = " ".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:])
        if proc.returncode == EXIT_REFUSED:  # the image: its signature, checksum, age, content
            raise StageRefused(f"imgbase update refused {url}: {last}",
                               hint="the agent will not download it again until the "
                               "group's desired image changes")
        raise ImgbaseError(f"imgbase update {url} failed: {last}",
                           hint="journalctl -u imgbase-agent; the agent tries again later")

    def drain(self, policy: str) -> None:
        """Running domains before a reboot: wait for them, shut them down, or migrate."""
        if policy == "wait":
            log.info("waiting for the running domains to stop before rebooting")
            time.sleep(DRAIN_POLL)
            return
        if policy == "migrate" and self.migrate_hook:
            run([self.migrate_hook], check=False)
            return
        import libvirt

        conn = libvirt.open("qemu:///system")
        try:
            for dom_id in conn.listDomainsID():
                dom = conn.lookupByID(dom_id)
                log.info("shutting down domain %s before the reboot", dom.name())
                dom.shutdown()
        finally:
            conn.close()
        time.sleep(DRAIN_POLL)

    def reboot(self, nvr: str, tries: int) -> None:
        """Make nvr's layer the default on trial (tries boots) -- the slot is ours now --
        and reboot."""
        from ..node.facts import NodeFacts
        from ..node.systemd import reboot

        facts = NodeFacts.gather()
        layers = sorted((lv.name for lv in facts.layout.layers if _nvr_of(lv.name) == nvr),
                        key=lambda name: Layer.parse(name).index)
        if not layers:
            raise ImgbaseError(f"no layer of {nvr} to reboot into", hint="it is staged again")
        run(["imgbase", "boot", "--set-default", layers[-1], "--tries", str(tries)])
        log.info("rebooting into %s (through logind)", layers[-1])
        reboot()
