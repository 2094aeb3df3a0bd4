"""The ``imgbase`` command: argparse dispatcher, one function per verb."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import EXIT_INTERRUPTED, EXIT_NO_RESULT, ImgbaseError, die
from .plan import JOURNAL, Plan, execute, locked
from .progress import Progress

if TYPE_CHECKING:
    from .agent.etcd import Etcd


def cmd_compose(args: argparse.Namespace) -> int:
    from .compose.build import DEFAULT_CACHE, compose_image
    from .image.spec import load_image
    from .resources import DEFAULT_IMAGE

    if args.list_backends:
        return list_backends(as_json=args.json)
    overrides = {k: v for k, v in (("version", args.image_version), ("release", args.release),
                                   ("backend", args.backend)) if v is not None}
    image = load_image(Path(args.image) if args.image else DEFAULT_IMAGE, overrides=overrides)
    progress = Progress(json_lines=args.json)
    compose_image(image, Path(args.output), progress=progress,
                  cache=Path(args.cache) if args.cache else DEFAULT_CACHE, rebuild=args.rebuild)
    return 0


def list_backends(*, as_json: bool) -> int:
    """Every compose backend: whether it composes here, and why not."""
    from .compose.backend import ComposerBackend

    rows = []
    for name, cls in ComposerBackend.backends().items():
        backend = cls()
        reason = backend.unavailable()
        rows.append({"name": name, "runs_here": reason is None, "reason": reason,
                     "summary": cls.describe(),
                     "missing": [{"tool": tool, "apt_package": pkg}
                                 for tool, pkg in backend.missing_tools()]})
    if as_json:
        print(json.dumps({"backends": rows}, indent=2))
        return 0
    width = max(len(str(row["name"])) for row in rows)
    for row in rows:
        state = "ready        " + str(row["summary"]) if row["runs_here"] else \
            f"unavailable  {row['reason']}"
        print(f"{row['name']:<{width}}  {state}".rstrip())
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from .compose.build import explain_diff

    names = explain_diff(Path(args.a), Path(args.b))
    if args.json:
        print(json.dumps({"differing": names}))
    else:
        print("\n".join(names) if names else "identical contents")
    return 1 if names else 0


def cmd_vm(args: argparse.Namespace) -> int:
    from .vm import Guest, VmSpec, selfcheck_result

    spec = VmSpec(
        live=Path(args.live) if args.live else None,
        disk=Path(args.disk) if args.disk else None,
        snapshot=not args.write,
        blank=tuple(args.blank),
        attach=tuple(Path(a) for a in args.attach),
        memory=args.memory,
        cpus=args.cpus,
        port=args.port,
        serial_log=Path(args.serial_log) if args.serial_log else None,
        cmdline=tuple(args.append),
        selfcheck=args.selfcheck,
        trusted=tuple(Path(k) for k in args.trust),
        firmware=args.firmware,
    )
    guest = Guest(spec)
    if args.selfcheck:
        guest.start()
        try:
            status = guest.wait_exit(args.timeout)
            lines = [line[line.index("IMGBASE-SELFCHECK"):]
                     for line in guest.serial_tail(1000).splitlines()
                     if "IMGBASE-SELFCHECK" in line]
        finally:
            guest.kill()
        print("\n".join(lines))
        verdict = selfcheck_result(status, lines)
        if verdict is None:
            print(f"imgbase: error: the guest ended (qemu status {status}) without a "
                  "self-check result (hint: keep the console with --serial-log FILE)",
                  file=sys.stderr)
            return EXIT_NO_RESULT
        return 0 if verdict else 1
    with guest:
        if args.run is not None:
            result = guest.run(args.run, check=False, timeout=args.timeout)
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
            return result.rc
        print(f"guest up on 127.0.0.1:{guest.port}; connect with: {guest.ssh_command()}")
        print("Ctrl-C (or poweroff in the guest) ends it.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            guest.wait_exit(timeout=10 * 365 * 86400)
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from .node.selfcheck import main as selfcheck_main

    return selfcheck_main(poweroff=args.poweroff)


def cmd_ssh_credential(args: argparse.Namespace) -> int:
    from .node.credentials import main as credentials_main

    return credentials_main([args.file])


def _apply(plan: Plan, args: argparse.Namespace, journal: Path | None = JOURNAL) -> int:
    """--dry-run prints the plan (--json: as JSON); otherwise run it, journaled."""
    if args.dry_run:
        print(plan.to_json() if args.json else plan.describe())
        return 0
    with locked():
        execute(plan, Progress(json_lines=args.json), journal=journal)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from .image import trust
    from .node import install

    join = None
    if args.join:
        join = install.join_config(args.join, args.group, args.ca, args.cert, args.key,
                                   user=args.etcd_user, password_file=args.etcd_password_file,
                                   insecure_http=args.insecure_http)
    elif (args.ca or args.cert or args.key or args.etcd_user or args.etcd_password_file
          or args.insecure_http):
        die("--ca, --cert, --key, --etcd-user, --etcd-password-file and --insecure-http go "
            "with --join", hint="add --join ENDPOINTS")
    trust.check_insecure(args.insecure)
    if args.image is not None and not Path(args.image).is_file():
        die(f"{args.image}: no such image", hint="give the .squashfs made by imgbase compose")
    from . import config

    # checked before anything else: --network FILE, else the [network] of this machine's
    # imgbase.toml (the live environment's), else the default (br0 over the primary NIC)
    network = (config.load_network(Path(args.network)) if args.network is not None
               else config.load(only=("network",)).network)
    facts, image = install.gather_facts(
        args.disk, lambda: install.verify(args.image, insecure=args.insecure, sums=args.sha256),
        volumes=args.volumes, pool_size=args.pool_size, wipe=args.wipe, vg=args.vg, join=join,
        menu_timeout=args.menu_timeout, network=network)
    try:
        return _apply(install.plan_install(facts), args, journal=install.JOURNAL)
    finally:
        image.discard()


def cmd_layout(args: argparse.Namespace) -> int:
    from .node import adopt

    facts = adopt.gather_facts(args.root, args.nvr, tuple(args.karg))
    return _apply(adopt.plan_adopt(facts), args, journal=adopt.JOURNAL)


def cmd_kickstart(args: argparse.Namespace) -> int:
    from .kickstart import render as kickstart

    if args.kickstart_verb == "list":
        print("\n".join(kickstart.list_lines()))
        return 0
    text = kickstart.render_command(
        args.template, image=args.image, url=args.url,
        site_file=args.site, nist=args.nist, endpoints=args.endpoint, group=args.group,
        kernel_args=args.karg, ssh_keys=args.ssh_key, image_spec=args.image_spec,
        repos=args.repo)
    kickstart.write_output(text, args.output)  # only a kickstart that passed validation
    return 0


def _names(status: dict[str, object], key: str) -> list[dict[str, object]]:
    items = status[key]
    assert isinstance(items, list)
    return items


def cmd_base(args: argparse.Namespace) -> int:
    from .node import layers as node_layers
    from .node.facts import NodeFacts
    from .node.status import collect

    if args.add:
        with node_layers.base_to_add(args.add, args.size, args.nvr, insecure=args.insecure,
                                     allow_downgrade=args.allow_downgrade) as plan:
            return _apply(plan, args)
    facts = NodeFacts.gather()
    if args.remove:
        return _apply(node_layers.plan_base_remove(facts, args.remove), args)
    bases = _names(collect(facts), "bases")
    print(json.dumps(bases, indent=2) if args.json else "\n".join(str(b["name"]) for b in bases))
    return 0


def cmd_layer(args: argparse.Namespace) -> int:
    from .node import layers as node_layers
    from .node.facts import NodeFacts
    from .node.status import collect

    facts = NodeFacts.gather()
    if args.add is not None:
        fstab = Path("/etc/fstab").read_text()
        base = args.add or facts.booted_base or ""
        node_layers.check_boot_space(facts.boot, facts.booted or facts.default,
                                     copies=2 if node_layers.needs_rescue(facts, base) else 1)
        return _apply(node_layers.plan_layer_add(facts, args.add or None, fstab), args)
    if args.remove:
        return _apply(node_layers.plan_layer_remove(facts, args.remove), args)
    layers = _names(collect(facts), "layers")
    print(json.dumps(layers, indent=2) if args.json
          else "\n".join(str(la["name"]) for la in layers))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from . import config
    from .node import check

    limits = check.limits(config.load().check, pool_data_max=args.pool_data_max,
                          pool_metadata_max=args.pool_metadata_max)
    results = check.run_checks(check.gather(limits))
    print(json.dumps(check.report(results), indent=2) if args.json else check.render(results))
    return 0 if all(r.ok for r in results) else 1


def cmd_recover(args: argparse.Namespace) -> int:
    from .node import recover
    from .node.facts import NodeFacts
    from .node.health import read_history
    from .plan import interrupted, read_journal

    journal = read_journal()
    what = interrupted(journal)
    facts = NodeFacts.gather()
    plan = recover.plan_recover(facts, recover.work_mounts(), journal,
                                boot_dirs=recover.layer_dirs(facts.boot),
                                history=read_history(), esp_stale=recover.esp_stale(facts))
    if not args.json:
        print(f"interrupted: {what}" if what else "no interrupted operation in the journal")
    return _apply(plan, args, journal=None)


def cmd_boot(args: argparse.Namespace) -> int:
    from .bootloader.grub import DEFAULT_MENU_TIMEOUT, MENU_TIMEOUT_KEY
    from .node import boot
    from .node.facts import NodeFacts

    facts = NodeFacts.gather()
    if args.next:
        return _apply(boot.plan_next(facts, args.next), args)
    if args.rescue is not None:
        return _apply(boot.plan_rescue(facts, args.rescue or None), args)
    if args.set_default:
        tries = None if args.no_trial else args.tries
        return _apply(boot.plan_set_default(facts, args.set_default, tries), args)
    if args.menu_timeout is not None:
        return _apply(boot.plan_menu_timeout(facts, args.menu_timeout), args)
    state = {"booted": facts.booted, "rescue": facts.rescued, "default": facts.default,
             "next": facts.env.get("next_entry") or None,
             "tries_left": facts.env.get("imgbase_tries") or None,
             "fallback": facts.env.get("imgbase_fallback") or None,
             "menu_timeout": int(facts.env.get(MENU_TIMEOUT_KEY) or DEFAULT_MENU_TIMEOUT)}
    print(json.dumps(state, indent=2) if args.json
          else "\n".join(f"{k}: {v}" for k, v in state.items()))
    return 0


def cmd_kargs(args: argparse.Namespace) -> int:
    from .node import kargs
    from .node.facts import NodeFacts

    facts = NodeFacts.gather()
    if not (args.append or args.delete or args.replace):
        current = kargs.current(facts, args.layer)[1]
        print(json.dumps(current) if args.json else " ".join(current))
        return 0
    return _apply(kargs.plan_kargs(facts, args.layer, append=args.append, delete=args.delete,
                                   replace=args.replace), args)


def cmd_health(args: argparse.Namespace) -> int:
    from .config import load as load_settings
    from .node import afterboot

    out = afterboot.check(load_settings(only=("health",)).health)
    if not out.env_kept:
        print("grubenv changed while the checks ran: left as it is now", file=sys.stderr)
    if args.json:
        print(json.dumps({**out.record, "events": out.events, "reboot": out.reboot}, indent=2))
    else:
        for r in out.results:
            print(f"{'ok  ' if r.ok else 'FAIL'} {r.tier:<8} {r.name:<20} {r.reason}")
        for event in out.events:
            print(f"{event['event']}: {event['layer']}" +
                  (f" ({event['reason']})" if event.get("reason") else ""))
        print(f"this boot ({out.booted}) is {'good' if out.good else 'NOT good'}: "
              f"{out.record['reason']}")
    if args.act:
        afterboot.act(out, lambda line: print(line, file=sys.stderr, flush=True))
    return 0 if out.good else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    from .node import rollback
    from .node.facts import NodeFacts
    from .node.health import read_history

    return _apply(rollback.plan_rollback(NodeFacts.gather(), read_history(), args.to,
                                         now=time.time()), args)


def cmd_reset(args: argparse.Namespace) -> int:
    from .node import reset
    from .node.facts import NodeFacts
    from .node.layers import check_boot_space

    facts = NodeFacts.gather()
    check_boot_space(facts.boot, facts.booted)
    fstab = Path("/etc/fstab").read_text()
    carry = reset.carried(Path("/"), args.keep_etc, args.factory)
    return _apply(reset.plan_reset(reset.ResetFacts(facts, fstab, carry), args.tries), args)


def cmd_pin(args: argparse.Namespace) -> int:
    from .node import gc
    from .node.facts import NodeFacts

    return _apply(gc.plan_pin(NodeFacts.gather(), args.base, args.verb == "pin"), args)


def cmd_gc(args: argparse.Namespace) -> int:
    from .config import load as load_settings
    from .node import gc
    from .node.facts import NodeFacts
    from .node.health import read_history

    keep = args.keep if args.keep is not None else load_settings().gc.keep
    return _apply(gc.plan_gc(NodeFacts.gather(), keep, read_history()), args)


def cmd_update(args: argparse.Namespace) -> int:
    from .node import update

    with update.prepared(args.source, insecure=args.insecure,
                         allow_downgrade=args.allow_downgrade, tries=args.tries,
                         full_copy=args.full_copy, stage_only=args.stage_only,
                         progress=Progress(json_lines=args.json)) as (facts, plan):
        if args.check:
            report = update.check_report(facts, Path("/run/imgbase"))
            print(json.dumps(report, indent=2) if args.json else update.render_report(report))
            return 0
        if args.dry_run:
            print(plan.to_json() if args.json else plan.describe())
            return 0
        execute(plan, Progress(json_lines=args.json))
    if args.json:
        pass
    elif args.stage_only:
        print(f"staged: {facts.nvr}; imgbase boot --set-default {facts.nvr}+1 to use it")
    else:
        print(f"updated: {facts.nvr} boots next, on trial ({args.tries} tries); reboot to use it")
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    from .image.package import build

    print(build(args.image, args.format, Path(args.output), Path(args.trusted)))
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from .image.trust import sign

    print(sign(args.image, key=args.key, homedir=args.homedir))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .node.verify import verify

    diffs = verify(args.base, args.image)
    if args.json:
        print(json.dumps({"base": args.base, "matches": not diffs, "differing": diffs}))
    else:
        print("\n".join(diffs) if diffs else f"{args.base} matches {args.image}")
    return 1 if diffs else 0


def cmd_etc_merge(args: argparse.Namespace) -> int:
    from .node.etcmerge import merge

    report = merge(Path(args.old_factory), Path(args.old_etc), Path(args.new_factory),
                   Path(args.target), policy=args.policy)
    for rel in report.conflicts:
        print(f"conflict: /etc/{rel} ({args.policy})")
    return 0


def _fleet_etcd(args: argparse.Namespace) -> tuple[Etcd, str]:
    """An etcd client from --endpoints (TLS and user flags), or from this node's agent.toml."""
    from dataclasses import replace

    from .agent.etcd import Etcd
    from .node import agentconfig as agent_config

    if args.endpoints:
        join = agent_config.Join(
            tuple(e for e in args.endpoints.split(",") if e), args.group or "default",
            ca=args.ca, cert=args.cert, key=args.key, user=args.user,
            password_file=args.password_file, insecure_http=args.insecure_http)
    else:
        try:
            conf = agent_config.load()
        except ImgbaseError as exc:
            die(f"no --endpoints, and this machine has no agent config ({exc.message})",
                hint="give --endpoints https://etcd:2379 (and --ca/--cert/--key for TLS)")
        join = replace(conf.join, group=args.group or conf.group)
    join.check("--endpoints", on_node=False)
    return Etcd(list(join.endpoints), ca=join.ca, cert=join.cert, key=join.key, user=join.user,
                password=join.password()), join.group


def _password_file(path: str) -> str:
    """The password in ``path``; a new random one (written 0600) when the file is missing."""
    import os
    import secrets

    file = Path(path)
    if file.exists():
        password = file.read_text().strip()
        if not password:
            die(f"{path} is empty", hint="remove it to have a new password made")
        return password
    password = secrets.token_urlsafe(24)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    return password


def cmd_fleet(args: argparse.Namespace) -> int:
    from .agent import fleet

    etcd, group = _fleet_etcd(args)
    with etcd:
        if args.fleet_verb == "set-image":
            want = fleet.set_image(etcd, group, args.nvr, args.url, args.max_unavailable,
                                   args.tries, resume=args.resume,
                                   insecure_http=args.insecure_http)
            print(f"group {group}: desired {want.nvr}, {want.max_unavailable} node(s) at a "
                  f"time, {want.tries} tries each")
        elif args.fleet_verb in ("pause", "resume"):
            fleet.set_rollout(etcd, group, "paused" if args.fleet_verb == "pause" else
                              "running", "paused by the admin" if args.fleet_verb == "pause"
                              else None, "admin")
            print(f"group {group}: rollout {args.fleet_verb}d")
        elif args.fleet_verb == "release":
            fleet.EtcdSlots(etcd, group).release(fleet.check_node_id(args.node))
            print(f"group {group}: {args.node} holds no reboot slot")
        elif args.fleet_verb == "init-auth":
            fleet.init_auth(etcd, _password_file(args.root_password_file))
            print(f"etcd auth is on; the admin is root (password in {args.root_password_file})")
        elif args.fleet_verb == "add-node":
            fleet.add_node(etcd, fleet.check_node_id(args.node), group,
                           _password_file(args.node_password_file))
            print(f"node {args.node} of group {group}: etcd user {args.node} (password in "
                  f"{args.node_password_file}); install it with --join ... --etcd-user "
                  f"{args.node} --etcd-password-file {args.node_password_file}")
        else:
            report = fleet.status(etcd)
            if args.json:
                print(json.dumps(report, indent=2, sort_keys=True))
            else:
                print(fleet.render_status(report))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .node.status import collect, render

    status = collect()
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0


def cmd_w(args: argparse.Namespace) -> int:
    from .node.status import collect

    booted = collect()["booted_layer"]
    if booted is None:
        print("imgbase: error: the running root is not an imgbase layer "
              "(hint: imgbase status shows the layers)", file=sys.stderr)
        return 1
    print(booted)
    return 0


JSON_HELP = "print JSON (the machine interface) instead of text"
#: verbs units and other verbs run, not an admin: not listed by imgbase --help
INTERNAL = ("etc-merge", "selfcheck", "ssh-credential")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgbase", description="Image-based hypervisor nodes on LVM thin pools.")
    parser.add_argument("--version", action="version", version=f"imgbase {__version__}")
    parser.add_argument("--debug", action="store_true", help="log every command run")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = sub.add_parser("compose", help="build a squashfs node image from layers",
                       description="Build <name>-<version>-<release>.squashfs, .manifest.json "
                       "and .sha256 from an image definition and its layers.")
    p.add_argument("image", metavar="IMAGE.toml", nargs="?",
                   help="image definition (default: the default node image, images/node.toml)")
    p.add_argument("-o", "--output", default="out", help="output directory (default: out)")
    p.add_argument("--backend", metavar="NAME",
                   help="compose with this backend instead of the image's (see --list-backends)")
    p.add_argument("--list-backends", action="store_true",
                   help="list the compose backends and whether each runs on this machine")
    p.add_argument("--cache",
                   help="cache directory (default: $IMGBASE_CACHE or /var/cache/imgbase)")
    p.add_argument("--rebuild", action="store_true",
                   help="build from scratch: no cached image, no cached package tree")
    p.add_argument("--image-version", help="override the image version (the spec's version)")
    p.add_argument("--release", help="override the image release")
    p.add_argument("--json", action="store_true", help="one JSON event per line on stdout")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("diff", help="name the files that differ between two images",
                       description="Compare two squashfs images file by file (contents, "
                       "mode, owner, mtime); exit 1 when they differ.")
    p.add_argument("a", metavar="A.squashfs", help="the first image")
    p.add_argument("b", metavar="B.squashfs", help="the second image")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("vm", help="boot an image or disk in qemu (TCG) with SSH on 127.0.0.1",
                       description="Boot a composed image live (--live) or an installed disk "
                       "(--disk, through its own bootloader). SSH access is injected at boot as "
                       "a system credential; the guest's SSH port is forwarded to 127.0.0.1.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--live", metavar="IMAGE.squashfs", help="boot this image live")
    what.add_argument("--disk", metavar="DISK", help="boot this disk image (qcow2 or raw)")
    p.add_argument("--write", action="store_true",
                   help="--disk: write to the disk itself (default: a throw-away overlay)")
    p.add_argument("--blank", action="append", default=[], metavar="SIZE",
                   help="attach a blank qcow2 disk of this size (thrown away after)")
    p.add_argument("--attach", action="append", default=[], metavar="FILE",
                   help="attach an existing disk image (written in place)")
    p.add_argument("--memory", type=int, default=2048, metavar="MiB",
                   help="guest memory (default 2048)")
    p.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    p.add_argument("--firmware", choices=("bios", "uefi", "secureboot"), default="bios",
                   help="bios (default; fastest), uefi (OVMF, q35) or secureboot (OVMF's "
                   "Secure Boot code with Microsoft's keys, q35 with SMM); a --disk keeps its "
                   "NVRAM next to it (DISK.FIRMWARE-vars.fd)")
    p.add_argument("--port", type=int, help="SSH port on 127.0.0.1 (default: a free one)")
    p.add_argument("--serial-log", metavar="FILE", help="keep the serial console here")
    p.add_argument("--append", action="append", default=[], metavar="KARG",
                   help="extra kernel argument (live boot)")
    p.add_argument("--trust", action="append", default=[], metavar="KEY.gpg",
                   help="--live: a public key the guest trusts (/etc/imgbase/trusted.d); the "
                   "image's .sha256 and .sha256.sig go to /run/imgbase/live/, for install")
    p.add_argument("--timeout", type=float, default=900, metavar="S",
                   help="limit for --run and --selfcheck (default 900)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--run", metavar="CMD",
                     help="run CMD over SSH, power off, exit with its status")
    how.add_argument("--selfcheck", action="store_true",
                     help="boot with the image's self-check; exit 0 if it passes")
    p.set_defaults(func=cmd_vm)

    p = sub.add_parser("install", help="install a node onto a disk (no anaconda)",
                       description="Partition DISK, create the VG, thin pool, the image's base "
                       "and first layer, the volumes, and a bootloader. In the live environment "
                       "IMAGE defaults to the running image.")
    p.add_argument("--disk", required=True, help="the whole disk, e.g. /dev/vdb")
    p.add_argument("image", nargs="?", metavar="IMAGE.squashfs",
                   help="the image to install (default: the running live image)")
    p.add_argument("--volumes", choices=["minimal", "nist"], default="minimal",
                   help="minimal: /var; nist: also /var/log, /var/log/audit, /var/crash, "
                   "/var/tmp, /home, /tmp")
    p.add_argument("--pool-size", help="thin pool size, e.g. 20G (default: 90%% of the VG)")
    p.add_argument("--vg", default="imgbase", help="volume group name (default: imgbase)")
    p.add_argument("--wipe", action="store_true", help="install over an existing node/LVM")
    p.add_argument("--menu-timeout", type=int, metavar="SECONDS",
                   help="how long GRUB's menu waits before it boots (default 2; 0: at once)")
    p.add_argument("--join", metavar="ENDPOINTS",
                   help="the cluster's etcd endpoints, comma-separated: the node's agent "
                   "joins it on boot (written to /etc/imgbase/agent.toml)")
    p.add_argument("--group", default="default", help="the node's update group (with --join)")
    p.add_argument("--ca", metavar="FILE", help="CA certificate for etcd TLS (with --join)")
    p.add_argument("--cert", metavar="FILE", help="client certificate (with --join)")
    p.add_argument("--key", metavar="FILE", help="client certificate key (with --join)")
    p.add_argument("--sha256", metavar="FILE",
                   help="the image's signed checksum file (its signature: FILE.sig); default "
                   "IMAGE.sha256, or in the live environment /run/imgbase/live/image.sha256")
    p.add_argument("--insecure", action="store_true",
                   help="accept an image without .sha256 or .sha256.sig, only where "
                   "imgbase.toml has [trust] allow_insecure = true")
    p.add_argument("--etcd-user", metavar="NODE", help="the node's etcd user, its node id "
                   "(with --join; imgbase fleet add-node makes it)")
    p.add_argument("--etcd-password-file", metavar="FILE",
                   help="the file holding that user's password (with --join)")
    p.add_argument("--insecure-http", action="store_true",
                   help="allow http:// endpoints and no etcd user (with --join; a lab only)")
    p.add_argument("--network", metavar="FILE",
                   help="a TOML file whose [network] declares the node's bridges, bonds, "
                   "VLANs and addresses (default: the [network] of /etc/imgbase/imgbase.toml "
                   "here, else bridge br0 over the primary NIC, DHCP)")
    _plan_args(p)
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("layout", help="adopt an anaconda thin-LVM install (kickstart %%post)",
                       description="Turn the root LV of an anaconda install (autopart "
                       "--type=thinp, liveimg) into a read-only base and a first layer, move "
                       "/var to its own volume and make the layer the default boot entry.")
    p.add_argument("--init", action="store_true", required=True,
                   help="make the anaconda install an imgbase node")
    p.add_argument("--from", dest="root", default="/", metavar="ROOT",
                   help="root of the installed system (default: /, as in %%post)")
    p.add_argument("--nvr", help="name the base (default: the image's NVR)")
    p.add_argument("--karg", action="append", default=[], metavar="ARG",
                   help="a kernel argument for the first layer, after the image's (repeatable)")
    _plan_args(p)
    p.set_defaults(func=cmd_layout)

    p = sub.add_parser("kickstart", help="anaconda kickstarts: node installs, lorax builds",
                       description="Render a kickstart from a template in kickstarts/ and "
                       "check it with pykickstart (Fedora and RHEL syntax); nothing is "
                       "written unless it passes. See docs/kickstart.md.")
    ksub = p.add_subparsers(dest="kickstart_verb", metavar="ACTION", required=True)
    kp = ksub.add_parser("list", help="the templates, with one line each")
    kp.set_defaults(func=cmd_kickstart)
    kp = ksub.add_parser("render", help="render and validate a kickstart",
                         description="Install templates (default node-thinp) take --image "
                         "(its sha256 goes into liveimg --checksum) and --url or the site "
                         "file's image_url; build templates (build-pxe-live) take "
                         "--image-spec. Flags replace the site file's values.")
    kp.add_argument("template", nargs="?", metavar="TEMPLATE",
                    help="a name from 'imgbase kickstart list', or a template file's path")
    kp.add_argument("--image", metavar="IMG.squashfs",
                    help="the image to install; its sha256 goes into liveimg --checksum "
                    "(install templates: required)")
    kp.add_argument("--url", help="where anaconda downloads the image (liveimg --url)")
    kp.add_argument("--site", metavar="SITE.toml", help="site parameters (docs/kickstart.md)")
    kp.add_argument("--nist", action="store_true",
                    help="node-explicit: separate /var/log, /var/log/audit, /var/tmp, /home, "
                    "/tmp (and /var/crash) volumes")
    kp.add_argument("--endpoint", action="append", metavar="URL",
                    help="the agent's etcd endpoint (repeat for more; replaces the site's)")
    kp.add_argument("--group", help="the node's update group (with endpoints)")
    kp.add_argument("--karg", action="append", metavar="ARG",
                    help="a kernel argument of the first layer (repeat; replaces the site's)")
    kp.add_argument("--ssh-key", action="append", metavar="KEY|FILE",
                    help="root's SSH public key, or a .pub file (repeat; replaces the site's)")
    kp.add_argument("--image-spec", metavar="IMAGE.toml",
                    help="build templates: the image definition whose layers to build")
    kp.add_argument("--repo", action="append", metavar="URL",
                    help="build templates: a package repository (repeat; default: the "
                    "image's repos)")
    kp.add_argument("-o", "--output", metavar="OUT", help="write the kickstart here (default: "
                    "stdout)")
    kp.set_defaults(func=cmd_kickstart)

    for noun, about in (("base", "bases (one per image version)"),
                        ("layer", "layers (writable snapshots of a base)")):
        p = sub.add_parser(noun, help=f"list, add or remove {about}")
        how = p.add_mutually_exclusive_group()
        how.add_argument("--list", action="store_true", help="the default")
        if noun == "base":
            how.add_argument("--add", metavar="IMAGE.squashfs", help="a new base from an image")
            p.add_argument("--nvr", help="--add: name of the base (default: the image's NVR)")
            p.add_argument("--size", default="8G", help="--add: size of the base (default 8G)")
            _trust_args(p)
            how.add_argument("--remove", metavar="NVR",
                             help="a base and its layers (never the booted one's)")
        else:
            how.add_argument("--add", nargs="?", const="", metavar="BASE",
                             help="a new layer on BASE (default: the booted layer's base)")
            how.add_argument("--remove", metavar="LAYER",
                             help="a layer (never the booted or the default one)")
        _plan_args(p)
        p.set_defaults(func=cmd_base if noun == "base" else cmd_layer)

    p = sub.add_parser("check", help="storage and boot health; exit 1 if a check fails",
                       description="Check the VG, pool, bases and layers, pool use against "
                       "limits (/etc/imgbase/imgbase.toml [check], default 80%), pool "
                       "autoextend, /var on its own volume, discard, and one boot entry per "
                       "layer.")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.add_argument("--pool-data-max", type=float, metavar="PCT",
                   help="pool data use limit, percent (default: [check] in imgbase.toml, 80)")
    p.add_argument("--pool-metadata-max", type=float, metavar="PCT",
                   help="pool metadata use limit, percent (default: [check], 80)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("recover", help="remove what an interrupted operation left",
                       description="Unmount and remove what an interrupted operation left: "
                       "half-made LVs, layers without a boot entry, boot entries without a "
                       "layer, retired LVs. Never the booted layer or its base.")
    _plan_args(p)
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("boot", help="which layer boots: default, next boot once, trials",
                       description="Without options, show the boot state. --next boots a "
                       "layer once. --set-default makes a layer the default on trial: GRUB "
                       "counts its boots down (--tries, default 3) until imgbase health marks "
                       "one good, and at 0 falls back to the previous good layer.")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--next", metavar="LAYER", help="boot LAYER once, at the next boot")
    how.add_argument("--set-default", metavar="LAYER", help="make LAYER the default")
    how.add_argument("--rescue", nargs="?", const="", metavar="BASE",
                     help="boot BASE's rescue entry once, at the next boot: the base "
                     "read-only under a tmpfs overlay, a root shell on the console "
                     "(default: the booted layer's base)")
    how.add_argument("--menu-timeout", type=int, metavar="SECONDS",
                     help="how long GRUB's menu waits before it boots (default 2; 0: at once)")
    p.add_argument("--tries", type=int, default=3, help="boots on trial (1-9, default 3)")
    p.add_argument("--no-trial", action="store_true", help="--set-default without a trial")
    _plan_args(p)
    p.set_defaults(func=cmd_boot)

    p = sub.add_parser("kargs", help="a layer's kernel arguments",
                       description="List or edit the kernel arguments of a layer (default: "
                       "the booted one); a layer added later from it carries them over.")
    p.add_argument("--layer", help="the layer (default: the booted one)")
    p.add_argument("--list", action="store_true", help="the default")
    p.add_argument("--append", action="append", metavar="ARG",
                   help="add a kernel argument (repeatable)")
    p.add_argument("--delete", action="append", metavar="ARG",
                   help="remove a kernel argument (repeatable)")
    p.add_argument("--replace", action="append", metavar="OLD=NEW",
                   help="replace a kernel argument (repeatable)")
    _plan_args(p)
    p.set_defaults(func=cmd_kargs)

    p = sub.add_parser("health", help="run the boot health checks (imgbase-health.service)",
                       description="Run the required and wanted checks, record them in "
                       "/var/lib/imgbase/health.json, mark a layer on trial good, or record "
                       "one that was abandoned. Exit 1 if a required check failed.")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.add_argument("--act", action="store_true",
                   help="reboot when a layer on trial is not healthy (the boot service does)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("rollback", help="make the previous good layer the default again",
                       description="Make the layer most recently found healthy (other than "
                       "the booted one) the default, with no trial; --to names another.")
    p.add_argument("--to", metavar="LAYER",
                   help="the layer to roll back to (default: the last good one)")
    _plan_args(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("reset", help="a fresh layer of the booted base, the node's identity "
                       "kept", description="Make a new layer of the booted base with the "
                       "image's factory /etc plus what makes the node this node (machine-id, "
                       "hostname, SSH host keys and root's keys, network, cluster join, "
                       "trusted keys), and make it the default on trial. /var is untouched; "
                       "the old layer stays until gc.")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--keep-etc", action="store_true",
                     help="carry all of /etc, not only the node's identity")
    how.add_argument("--factory", action="store_true",
                     help="carry nothing: the node forgets its identity, network and cluster")
    p.add_argument("--tries", type=int, default=3, metavar="N",
                   help="boots the new layer gets to come up healthy (1-9, default 3)")
    _plan_args(p)
    p.set_defaults(func=cmd_reset)

    for verb in ("pin", "unpin"):
        p = sub.add_parser(verb, help=f"{verb} a base: gc never removes a pinned base")
        p.add_argument("base", metavar="BASE", help="the base (imgbase base --list)")
        _plan_args(p)
        p.set_defaults(func=cmd_pin)

    p = sub.add_parser("gc", help="remove old images (bases and their layers)",
                       description="Keep the N newest bases (default 2), the bases of the "
                       "booted and default layers and the pinned ones; remove the rest.")
    p.add_argument("--keep", type=int, metavar="N",
                   help="images to keep (default: [gc] keep in imgbase.toml, or 2)")
    _plan_args(p)
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("update", help="a new base and layer from an image; boots next, on trial",
                       description="Verify the image (sha256, product, version, space), "
                       "make a new base as a delta of the closest one, a new layer with /etc "
                       "merged and the kernel arguments carried, and make it the default on "
                       "trial. Exit 77 when the image is already on the node.")
    p.add_argument("source", metavar="IMAGE.squashfs|URL",
                   help="a path, or an http(s) URL (downloaded resumably to "
                   "/var/lib/imgbase/downloads with its .sha256 and .sha256.sig)")
    _trust_args(p)
    p.add_argument("--full-copy", action="store_true",
                   help="unpack the whole image into a new base instead of a delta of the "
                   "closest one (slower; for a base you no longer trust)")
    p.add_argument("--tries", type=int, default=3, help="boots on trial (default 3)")
    p.add_argument("--stage-only", action="store_true",
                   help="make the new base and layer, but leave the default alone (what "
                   "imgbase-agent does: it switches when its reboot slot is granted)")
    p.add_argument("--check", action="store_true",
                   help="report what would change (packages, /etc merge, kargs, space)")
    _plan_args(p)
    p.set_defaults(func=cmd_update)

    p = sub.add_parser("package", help="wrap an image as a deb or rpm that updates a node",
                       description="Verify the image (sha256 and a signature by a key in "
                       "--trusted), then build <name>-image-update from the verified copy: the "
                       "image with its .sha256 and .sha256.sig under /usr/share/imgbase/images, "
                       "and a post-install script that verifies it again with the node's "
                       "imgbase and trusted keys before it runs imgbase update with the new "
                       "image's imgbase.")
    p.add_argument("image", metavar="IMAGE.squashfs", help="the signed image to wrap")
    p.add_argument("--format", required=True, choices=("deb", "rpm"), help="the package format")
    p.add_argument("-o", "--output", default=".", metavar="DIR",
                   help="where to write the package (default: .)")
    p.add_argument("--trusted", default="/etc/imgbase/trusted.d", metavar="DIR",
                   help="the publisher keys (*.gpg) to check the image's signature with "
                   "(default: /etc/imgbase/trusted.d)")
    p.set_defaults(func=cmd_package)

    p = sub.add_parser("sign", help="sign an image's .sha256 with gpg (IMAGE.sha256.sig)",
                       description="Write a detached OpenPGP signature of IMAGE.sha256. Nodes "
                       "accept the image when the signing key is in /etc/imgbase/trusted.d/.")
    p.add_argument("image", metavar="IMAGE.squashfs", help="the image whose .sha256 to sign")
    p.add_argument("--key", help="the key to sign with (gpg --local-user)")
    p.add_argument("--homedir", help="gpg's home directory")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("verify", help="prove a base holds exactly its image (read-only)")
    p.add_argument("base", metavar="BASE", help="the base to check")
    p.add_argument("image", metavar="IMAGE.squashfs", help="the image it was made from")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_verify)

    # internal verbs: callable, not listed by imgbase --help (INTERNAL)
    p = sub.add_parser("etc-merge", description="Internal, used by imgbase update: the 3-way "
                       "merge of /etc into a new layer.")
    for name, meaning in (("old_factory", "the booted image's factory /etc"),
                       ("old_etc", "the booted layer's /etc, with the admin's edits"),
                       ("new_factory", "the new image's factory /etc"),
                       ("target", "the new layer's /etc, merged in place")):
        p.add_argument(name, help=meaning)
    p.add_argument("--policy", choices=["keep-local", "take-new"], default="keep-local",
                   help="a file both sides changed: keep the admin's or take the image's "
                   "(default: keep-local)")
    p.set_defaults(func=cmd_etc_merge)

    p = sub.add_parser("status", help="bases, layers, pool and volumes of this node",
                       description="Show the node's bases and layers (booted, default and "
                       "next-boot marks), pool usage and volumes; --json is the machine "
                       "interface (docs/status.schema.json).")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("fleet", help="the cluster: desired image per group, rollouts, nodes",
                       description="Talk to the cluster's etcd (from --endpoints, or this "
                       "node's /etc/imgbase/agent.toml): publish the image a group should "
                       "run, watch the rollout, pause or resume it.")
    fsub = p.add_subparsers(dest="fleet_verb", metavar="ACTION", required=True)
    fp = fsub.add_parser("set-image", help="the image a group should run; agents roll it")
    fp.add_argument("nvr", metavar="NVR", help="the image's name-version-release")
    fp.add_argument("url", metavar="URL", help="where nodes download IMAGE (and .sha256, .sig)")
    fp.add_argument("--max-unavailable", type=int, default=1, metavar="K",
                    help="nodes of the group rebooting at once (1-100, default 1)")
    fp.add_argument("--resume", action="store_true",
                    help="resume the group's rollout if it is paused (else set-image refuses)")
    fp.add_argument("--tries", type=int, default=3, metavar="N",
                    help="boots a node gives the new image before GRUB falls back (1-9, "
                    "default 3; 1: a canary that falls back at its first failed boot)")
    fsub.add_parser("status", help="nodes, versions, health, slot holders, rollout state")
    fsub.add_parser("pause", help="stop handing out reboot slots in the group")
    fsub.add_parser("resume", help="hand out reboot slots again")
    fp2 = fsub.add_parser("release", help="free a node's reboot slot (a node that never came "
                          "back)")
    fp2.add_argument("node", metavar="NODE-ID", help="the node whose slot to free")
    fp3 = fsub.add_parser("init-auth", help="make etcd's root user and turn etcd auth on "
                          "(once, as the cluster's first admin step)")
    fp3.add_argument("--root-password-file", required=True, metavar="FILE",
                     help="root's password (a new random one is written there, 0600, when "
                     "the file is missing)")
    fp4 = fsub.add_parser("add-node", help="a node's etcd user and role: it may write only "
                          "its own record, slot and result")
    fp4.add_argument("node", metavar="NODE-ID", help="the node's id: its etcd user")
    fp4.add_argument("--node-password-file", required=True, metavar="FILE",
                     help="the node's password (made, 0600, when the file is missing); "
                     "give it to install --join --etcd-password-file")
    for q in fsub.choices.values():
        q.add_argument("--group", help="the update group (default: the node's, or default)")
        q.add_argument("--endpoints", help="etcd endpoints, comma-separated")
        q.add_argument("--ca", help="CA certificate (TLS)")
        q.add_argument("--cert", help="client certificate (TLS)")
        q.add_argument("--key", help="client certificate key (TLS)")
        q.add_argument("--user", help="etcd user (the admin: root)")
        q.add_argument("--password-file", metavar="FILE", help="the etcd user's password")
        q.add_argument("--insecure-http", action="store_true",
                       help="allow http:// endpoints and image URLs (a lab only)")
        q.add_argument("--json", action="store_true", help=JSON_HELP)
        q.set_defaults(func=cmd_fleet)

    p = sub.add_parser("w", help="name the booted layer")
    p.set_defaults(func=cmd_w)

    p = sub.add_parser("selfcheck", description="Internal, run by imgbase-selfcheck.service: "
                       "the image's boot checks inside a booted node.")
    p.add_argument("--poweroff", action="store_true",
                   help="then end the boot (qemu: result as its exit status)")
    p.set_defaults(func=cmd_selfcheck)

    p = sub.add_parser("ssh-credential", description="Internal, run by "
                       "imgbase-ssh-credential.service: add root's SSH keys from a credential "
                       "file.")
    p.add_argument("file", help="the credential file of authorized_keys lines")
    p.set_defaults(func=cmd_ssh_credential)
    return parser


def _trust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure", action="store_true",
                   help="accept an image without .sha256 or .sha256.sig, only where "
                   "imgbase.toml has [trust] allow_insecure = true (a bad one is still "
                   "refused)")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="accept an image older than the newest this node has accepted")


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--json", action="store_true",
                   help="with --dry-run: the plan as JSON; else JSON progress events")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C and SIGTERM both stop a command cleanly (also when started from a shell
    # that set SIGINT to be ignored, as non-interactive shells do for background jobs).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ImgbaseError as exc:
        print(f"imgbase: error: {exc.oneline()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("imgbase: interrupted; nothing was published", file=sys.stderr)
        return EXIT_INTERRUPTED
