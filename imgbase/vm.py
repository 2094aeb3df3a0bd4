"""Boot images in qemu (always TCG): a live squashfs or an installed disk.

``Guest`` is the Python API behind ``imgbase vm`` and the test harness::

    with Guest(VmSpec(live=Path("out/imgbase-node-1.0-1.squashfs"))) as g:
        print(g.run("uname -r").stdout)

SSH access is injected at boot as the ``ssh.authorized_keys.root`` system
credential (SMBIOS type 11), never baked into the image. Networking is
``-nic user,restrict=on`` with SSH forwarded to a free port on 127.0.0.1.

A disk guest that resets (``reboot``, a panic, sysrq) gets a fresh qemu on the same
disk: qemu runs with ``-no-reboot``, its QMP ``SHUTDOWN`` event says the guest reset,
and ``Guest`` starts it again. To the guest that is a power cycle; GRUB, grubenv and the
boot counter see the same disk. Under TCG it is ~22 s faster per reboot than SeaBIOS's
warm reset, which spends ~7 s before GRUB and ~16 s more loading the kernel.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import ImgbaseError, die
from .image import squashfs
from .node.selfcheck import FAIL_CODE, PASS_CODE
from .run import run

#: the kernel argument (or credential) that asks a boot for the self-check: the units
#: in boot/systemd/ test for it (imgbase-selfcheck runs, health and the agent do not)
SELFCHECK = "imgbase.selfcheck"
QEMU = "qemu-system-x86_64"
# paramiko logs every refused attempt while a guest boots; our errors say what matters
logging.getLogger("paramiko").setLevel(logging.CRITICAL)
# qemu64 without SVM: the guest sees a TCG-only host (no /dev/kvm; libvirt offers
# domain type qemu only). Not "max,-svm[,-vmx]": with "max" minus SVM, this machine's
# qemu 7.2 TCG and the Debian 6.1 kernel print every d_path() (mountinfo,
# /proc/*/cwd) as "xxx" names, which breaks systemd's mount units and sandboxing.
CPU_MODEL = "qemu64,-svm"
SSH_TIMEOUT = 300.0  # TCG boots take ~30 s here; allow for a loaded CI machine


class GuestError(ImgbaseError):
    """The guest failed: carries the tail of its serial console."""


@dataclass(frozen=True)
class VmSpec:
    live: Path | None = None  # boot this squashfs live (kernel/initrd taken from it)
    disk: Path | None = None  # boot this disk through its own bootloader
    snapshot: bool = True  # --disk: write to a throw-away qcow2 overlay, not the disk
    blank: tuple[str, ...] = ()  # sizes of blank qcow2 disks, e.g. "20G"
    attach: tuple[Path, ...] = ()  # existing disk images, written in place
    memory: int = 2048  # MiB
    cpus: int = 2
    port: int | None = None  # SSH port on 127.0.0.1 (None: a free one)
    serial_log: Path | None = None
    cmdline: tuple[str, ...] = ()  # extra kernel arguments (live boot only)
    credentials: tuple[tuple[str, str], ...] = ()  # extra system credentials
    selfcheck: bool = False  # boot, run the image's self-check, power off
    network: bool = True
    # (guest port, host port): the guest reaches 127.0.0.1:<host port> on the host as
    # GUESTFWD_ADDR:<guest port> (qemu guestfwd; still no other network)
    guestfwd: tuple[tuple[int, int], ...] = ()
    # live: public keyrings put into the guest's /etc/imgbase/trusted.d (the live image's
    # IMAGE.sha256 and .sig, when next to it, go to /run/imgbase/live/: what
    # `imgbase install` checks the running image against)
    trusted: tuple[Path, ...] = ()
    # bios (SeaBIOS, pc) | uefi (OVMF, q35) | secureboot (OVMF's Secure Boot code, q35 with
    # SMM, Microsoft's keys enrolled): see FIRMWARE
    firmware: str = "bios"


GUESTFWD_ADDR = "10.0.2.100"


@dataclass(frozen=True)
class Firmware:
    """A firmware of Debian's ovmf package: its code (read-only) and the variables it
    starts from (copied per disk: a machine's NVRAM)."""

    code: Path
    vars: Path
    machine: str
    secure: bool


OVMF = Path("/usr/share/OVMF")
FIRMWARE: dict[str, Firmware | None] = {
    "bios": None,
    "uefi": Firmware(OVMF / "OVMF_CODE_4M.fd", OVMF / "OVMF_VARS_4M.fd", "q35", False),
    "secureboot": Firmware(OVMF / "OVMF_CODE_4M.secboot.fd", OVMF / "OVMF_VARS_4M.ms.fd",
                           "q35,smm=on", True),
}


def firmware_argv(name: str, nvram: Path) -> list[str]:
    """qemu's machine and flash for a firmware; nvram: this machine's copy of the vars
    (made from the firmware's when it does not exist, then kept: NVRAM persists).

    >>> firmware_argv("bios", Path("/x"))
    []
    >>> firmware_argv("secureboot", Path("/tmp/x.vars"))[:4]
    ['-machine', 'q35,smm=on', '-global', 'driver=cfi.pflash01,property=secure,value=on']
    """
    fw = FIRMWARE[name]
    if fw is None:
        return []
    return ["-machine", fw.machine,
            *(["-global", "driver=cfi.pflash01,property=secure,value=on"] if fw.secure else []),
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={fw.code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={nvram}"]


def nvram_of(spec: VmSpec, rundir: Path) -> Path:
    """Where a guest's NVRAM is kept: next to its disk (so it persists across boots of
    that disk, as a server's does), else for this run only."""
    if spec.disk is not None:
        disk = spec.disk.resolve()
        return disk.with_name(f"{disk.name}.{spec.firmware}-vars.fd")
    return rundir / f"{spec.firmware}-vars.fd"


@dataclass
class CommandResult:
    command: str
    rc: int
    stdout: str
    stderr: str


@dataclass
class Guest:
    spec: VmSpec
    rundir: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    port: int = field(default=0, init=False)
    resets: int = field(default=0, init=False)  # guest resets followed by a fresh qemu
    _ssh: Any = field(default=None, init=False)
    _own_rundir: bool = field(default=False, init=False)
    _argv: list[str] = field(default_factory=list, init=False)
    _shutdown: list[str] = field(default_factory=list, init=False)  # this qemu's SHUTDOWNs
    _events: threading.Thread | None = field(default=None, init=False)
    _stopping: bool = field(default=False, init=False)
    # QMP on an abstract unix socket: no path length limit, nothing to clean up
    _qmp_name: str = field(default_factory=lambda: f"imgbase-qmp-{os.urandom(8).hex()}",
                           init=False)
    _console_name: str = field(
        default_factory=lambda: f"imgbase-console-{os.urandom(8).hex()}", init=False)
    _console: socket.socket | None = field(default=None, init=False)

    # -- lifecycle ------------------------------------------------------------
    def __enter__(self) -> Guest:
        self.start()
        if not self.spec.selfcheck:
            try:
                self.wait_ssh()
                if self.spec.live:
                    self.hand_trust(self.spec.live, self.spec.trusted)
            except BaseException:
                self.kill()
                raise
        return self

    def hand_trust(self, image: Path, keys: tuple[Path, ...]) -> None:
        """Give a live guest what it needs to verify the image it runs: the image's
        .sha256 and .sha256.sig (if they are next to it) and the trusted keys."""
        files = [(Path(f"{image}{suffix}"), f"/run/imgbase/live/image{suffix}")
                 for suffix in (".sha256", ".sha256.sig")]
        files += [(key, f"/etc/imgbase/trusted.d/{key.name}") for key in keys]
        for src, dest in files:
            if src.is_file():
                data = base64.b64encode(src.read_bytes()).decode()
                self.run(f"mkdir -p {shlex.quote(str(Path(dest).parent))} && "
                         f"echo {data} | base64 -d > {shlex.quote(dest)}")

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def serial_log(self) -> Path:
        assert self.rundir is not None
        return self.spec.serial_log or self.rundir / "serial.log"

    @property
    def key(self) -> Path:
        assert self.rundir is not None
        return self.rundir / "id_ed25519"

    @property
    def ssh_config(self) -> Path:
        assert self.rundir is not None
        return self.rundir / "ssh_config"

    def ssh_command(self) -> str:
        return f"ssh -F {self.ssh_config} guest"

    def start(self) -> None:
        preflight(self.spec)
        if self.rundir is None:
            self.rundir = Path(tempfile.mkdtemp(prefix="imgbase-vm."))
            self._own_rundir = True
        self.rundir.mkdir(parents=True, exist_ok=True)
        self.port = self.spec.port or free_port()
        self._argv = self._qemu_argv()
        (self.rundir / "qemu.argv").write_text("\n".join(self._argv) + "\n")
        self.serial_log.parent.mkdir(parents=True, exist_ok=True)
        self.serial_log.write_text("")
        self._launch()

    @property
    def follows_resets(self) -> bool:
        """A disk guest boots again after a reset; a live or self-check guest ends."""
        return bool(self.spec.disk) and not self.spec.selfcheck

    def _launch(self) -> None:
        assert self.rundir is not None
        self.proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.rundir / "qemu.stderr", "wb"),  # noqa: SIM115
                                     start_new_session=True, preexec_fn=_die_with_parent)
        (self.rundir / "qemu.pid").write_text(f"{self.proc.pid}\n")
        # qemu waits for this connection before it starts the guest (wait=on), so the log
        # has every byte of the boot; it stays open for the qemu's life
        if self._console is not None:
            self._console.close()
        self._console = _connect(self._console_name, self.proc)
        if self._console is None:
            if self.proc.poll() is not None:
                raise self._failure("qemu exited as it started")
            # alive, and waiting for a console that never came (_failure kills it)
            raise self._failure("cannot connect to the guest's console socket")
        threading.Thread(target=_drain, args=(self._console,), daemon=True).start()
        self._shutdown = []
        self._events = None
        if self.follows_resets:
            sock = _qmp_connect(self._qmp_name, self.proc)
            if sock is not None:
                self._events = threading.Thread(target=_read_shutdowns,
                                                args=(sock, self._shutdown), daemon=True)
                self._events.start()

    def _follow_reset(self) -> bool:
        """If our qemu ended because the guest reset, start it again; True if it did."""
        if (not self.follows_resets or self._stopping or self.proc is None
                or self.proc.poll() is None):
            return False
        if self._events is not None:
            self._events.join(timeout=5)  # qemu has exited: the event is read or never comes
        if self._shutdown[-1:] != ["guest-reset"]:
            return False
        self.resets += 1
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        self._launch()
        return True

    def alive(self) -> bool:
        self._follow_reset()
        return self.proc is not None and self.proc.poll() is None

    def wait_ssh(self, timeout: float = SSH_TIMEOUT) -> float:
        """Wait until SSH answers; return the seconds it took."""
        import paramiko

        t0 = time.monotonic()
        last: Exception | None = None
        while time.monotonic() - t0 < timeout:
            if not self.alive():
                raise self._failure("qemu exited before the guest answered on SSH")
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                # short timeouts: while the guest is down, qemu's slirp accepts the TCP
                # connection and nothing answers; a long banner wait only delays noticing
                # the boot (a slow guest just takes another round)
                client.connect("127.0.0.1", port=self.port, username="root",
                               key_filename=str(self.key), timeout=3, banner_timeout=4,
                               auth_timeout=10, look_for_keys=False, allow_agent=False)
                self._ssh = client
                return time.monotonic() - t0
            except Exception as exc:  # not up yet: refused, reset, no banner, no key yet
                last = exc
                client.close()
                time.sleep(1)
        raise self._failure(f"the guest did not answer on SSH within {timeout:.0f} s "
                            f"(last error: {last!r})")

    def wait_exit(self, timeout: float) -> int:
        """Wait until the guest powers off (a disk guest's resets are followed)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            try:
                status = self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise self._failure(
                    f"the guest did not power off within {timeout:.0f} s") from None
            if not self._follow_reset():
                return status

    def stop(self, timeout: float = 60) -> None:
        """Power the guest off (SSH), wait, then kill our qemu if it is still there."""
        self._stopping = True
        if self.alive() and self._ssh is not None:
            with contextlib.suppress(Exception):
                self._ssh.exec_command("systemctl poweroff", timeout=5)
            try:
                assert self.proc is not None
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """Kill the qemu this Guest started (by pid, never by name)."""
        self._stopping = True
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._own_rundir and self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self._own_rundir = False

    def boot_id(self) -> str:
        return self.run("cat /proc/sys/kernel/random/boot_id", timeout=30).stdout.strip()

    def reboot(self, timeout: float = SSH_TIMEOUT) -> float:
        """Reboot the guest (disk boots only) and wait for SSH from the new boot."""
        if self.spec.live or self.spec.selfcheck:
            raise ImgbaseError("only a guest booted from a disk can reboot",
                               hint="live and self-check guests end when they reboot")
        old = self.boot_id()
        self.run("systemd-run --on-active=1 --no-block systemctl reboot")
        return self.wait_new_boot(old, timeout)

    def wait_new_boot(self, old: str, timeout: float = SSH_TIMEOUT) -> float:
        """Wait until the guest answers SSH from a boot other than `old` (a boot_id): after
        a reboot it was asked for, or one it did by itself (a power cut, a fallback)."""
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            time.sleep(3)
            self.wait_ssh(timeout - (time.monotonic() - t0))
            try:  # the old boot may still answer, or drop us, while it goes down
                if self.boot_id() != old:
                    return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - any SSH failure here means: not up yet
                pass
            if self._ssh is not None:
                self._ssh.close()
                self._ssh = None
        raise self._failure(f"the guest did not come back within {timeout:.0f} s")

    # -- using the guest ------------------------------------------------------
    def run(self, command: str, *, check: bool = True, timeout: float = 600) -> CommandResult:
        """Run a shell command as root in the guest; raise with its output on failure."""
        if self._ssh is None:
            raise ImgbaseError("the guest has no SSH connection")
        _, out, err = self._ssh.exec_command(command, timeout=timeout)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        rc = out.channel.recv_exit_status()
        result = CommandResult(command, rc, stdout, stderr)
        if check and rc != 0:
            raise GuestError(f"in the guest, {command!r} exited {rc}: "
                             f"{(stderr or stdout).strip()[-2000:]}")
        return result

    def host(self) -> Any:
        """A testinfra host over SSH (paramiko backend)."""
        import testinfra

        return testinfra.get_host("paramiko://guest", ssh_config=str(self.ssh_config))

    def wait_console(self, pattern: str, since: int = 0, timeout: float = SSH_TIMEOUT
                     ) -> re.Match[str]:
        """Wait until the serial log, from byte since on, matches pattern (a regex); resets
        of the guest on the way are followed."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.alive():
                raise self._failure(f"qemu exited before the console showed {pattern!r}")
            text = self.serial_log.read_bytes()[since:].decode(errors="replace")
            if m := re.search(pattern, text):
                return m
            time.sleep(1)
        raise self._failure(f"the console did not show {pattern!r} within {timeout:.0f} s")

    def console_send(self, text: str) -> None:
        """Type text at the serial console (a rescue shell reads it there)."""
        self.alive()  # a reset is followed first: the text goes to the running qemu
        if self._console is None:
            raise self._failure("the guest's console is not connected")
        self._console.sendall(text.encode())

    def serial_tail(self, lines: int = 30) -> str:
        try:
            text = self.serial_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])

    def _failure(self, message: str) -> GuestError:
        tail = self.serial_tail()
        stderr = ""
        if self.rundir and (self.rundir / "qemu.stderr").exists():
            stderr = (self.rundir / "qemu.stderr").read_text(errors="replace").strip()
        self.kill()
        detail = f"{message}\n--- qemu stderr ---\n{stderr}\n" if stderr else f"{message}\n"
        err = GuestError(detail + f"--- last serial lines ---\n{tail}",
                         hint=f"the full serial log is {self.serial_log}")
        err.message = message + (f": {stderr.splitlines()[-1]}" if stderr else "")
        err.serial_tail = tail  # type: ignore[attr-defined]
        return err

    # -- qemu command line ----------------------------------------------------
    def _qemu_argv(self) -> list[str]:
        assert self.rundir is not None
        s = self.spec
        argv = [QEMU, "-accel", "tcg,thread=multi", "-cpu", CPU_MODEL,
                "-smp", str(s.cpus), "-m", str(s.memory),
                # a live guest (panic=-1) and a self-check end when they reboot; a disk
                # guest's reset ends this qemu too, and the next one boots it (follows_resets)
                "-no-reboot",
                *(["-chardev", f"socket,id=qmp,path={self._qmp_name},abstract=on,server=on,"
                   "wait=off", "-mon", "chardev=qmp,mode=control"]
                  if self.follows_resets else []),
                "-display", "none", "-monitor", "none", "-vga", "none",
                # logged (appended to, so one log holds every boot of the guest) whether or
                # not anyone is connected; the socket types at the console (console_send)
                "-chardev", f"socket,id=serial0,path={self._console_name},abstract=on,"
                f"server=on,wait=on,logfile={self.serial_log},logappend=on",
                "-serial", "chardev:serial0",
                "-device", "isa-debug-exit,iobase=0x501,iosize=0x02"]
        if FIRMWARE[s.firmware] is not None:
            nvram = nvram_of(s, self.rundir)
            if not nvram.exists():
                fw = FIRMWARE[s.firmware]
                assert fw is not None
                shutil.copyfile(fw.vars, nvram)
            argv += firmware_argv(s.firmware, nvram)
        drives: list[str] = []
        if s.live:
            kernel, initrd = extract_boot_files(s.live, self.rundir)
            cmdline = ["root=/dev/vda", "rootfstype=squashfs", "ro", "imgbase.live",
                       "console=ttyS0,115200", "panic=-1", *s.cmdline]
            if s.selfcheck:
                cmdline.append(SELFCHECK)
            argv += ["-kernel", str(kernel), "-initrd", str(initrd),
                     "-append", " ".join(cmdline)]
            drives.append(f"file={s.live},format=raw,readonly=on")
        if s.disk:
            disk = s.disk.resolve()
            if s.snapshot:
                overlay = self.rundir / "disk-overlay.qcow2"
                run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", image_format(disk),
                     "-b", str(disk), str(overlay)])
                disk = overlay
            drives.append(f"file={disk},format={image_format(disk)},cache=unsafe,"
                          "discard=unmap")
        for i, size in enumerate(s.blank):
            blank = self.rundir / f"blank{i}.qcow2"
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(blank), size])
            drives.append(f"file={blank},format=qcow2,cache=unsafe,discard=unmap")
        for path in s.attach:
            drives.append(f"file={path.resolve()},format={image_format(path)},cache=unsafe,"
                          "discard=unmap")
        for i, drive in enumerate(drives):
            boot = ",bootindex=0" if i == 0 and s.disk else ""
            argv += ["-drive", f"{drive},if=none,id=d{i}",
                     "-device", f"virtio-blk-pci,drive=d{i},serial=imgbase{i}{boot}"]
        if s.network and not s.selfcheck:
            # cmd: a socat per guest connection. (A chardev target, "-tcp:HOST:PORT", is ONE
            # connection made when qemu starts: every guest connection shares that stream,
            # and once the server closes it nothing gets through again.)
            fwd = "".join(f",guestfwd=tcp:{GUESTFWD_ADDR}:{g}-cmd:socat - TCP:127.0.0.1:{h}"
                          for g, h in s.guestfwd)
            argv += ["-nic", "user,restrict=on,model=virtio-net-pci,"
                     f"hostfwd=tcp:127.0.0.1:{self.port}-:22{fwd}"]
        else:
            argv += ["-nic", "none"]
        creds = list(s.credentials)
        if not s.selfcheck:
            creds.append(("ssh.authorized_keys.root", self._make_key()))
        elif s.disk:
            creds.append((SELFCHECK, "1"))
        for name, value in creds:
            b64 = base64.b64encode(value.encode()).decode()
            argv += ["-smbios", f"type=11,value=io.systemd.credential.binary:{name}={b64}"]
        return argv

    def _make_key(self) -> str:
        if not self.key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "imgbase-vm",
                 "-f", str(self.key)])
        self.ssh_config.write_text(
            f"Host guest\n  HostName 127.0.0.1\n  Port {self.port}\n  User root\n"
            f"  IdentityFile {self.key}\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
        return self.key.with_suffix(".pub").read_text()


RESULT_LINE = "IMGBASE-SELFCHECK-RESULT "


def selfcheck_result(exit_status: int, lines: Sequence[str] = ()) -> bool | None:
    """The verdict of a self-check boot: True pass, False fail, None no result.

    qemu's exit status carries it (isa-debug-exit). Under Secure Boot the kernel is locked
    down and refuses the guest the port (ioperm), so the guest powers off cleanly (status
    0) after its result line on the console: only then is that line the verdict.

    >>> selfcheck_result((PASS_CODE << 1) | 1), selfcheck_result(0, [RESULT_LINE + "fail"])
    (True, False)
    >>> print(selfcheck_result(0), selfcheck_result(1, [RESULT_LINE + "pass"]))
    None None
    """
    if exit_status == (PASS_CODE << 1) | 1:
        return True
    if exit_status == (FAIL_CODE << 1) | 1:
        return False
    results = [line.removeprefix(RESULT_LINE) for line in lines if line.startswith(RESULT_LINE)]
    if exit_status == 0 and results and results[-1] in ("pass", "fail"):
        return results[-1] == "pass"
    return None


# -- helpers ------------------------------------------------------------------

def _connect(name: str, proc: subprocess.Popen[bytes]) -> socket.socket | None:
    """Connect to one of a starting qemu's abstract unix sockets (None: qemu died)."""
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect("\0" + name)
        except OSError:
            sock.close()
            time.sleep(0.05)
            continue
        return sock
    return None


def _qmp_connect(name: str, proc: subprocess.Popen[bytes]) -> socket.socket | None:
    """Connect to a starting qemu's QMP socket and enable its events (None: qemu died)."""
    sock = _connect(name, proc)
    if sock is not None:
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
    return sock


def _drain(sock: socket.socket) -> None:
    """Read the console until qemu closes it (qemu's logfile keeps what it says; a console
    nobody reads would make qemu's serial port drop and repeat characters)."""
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass


def _read_shutdowns(sock: socket.socket, reasons: list[str]) -> None:
    """Thread: append the reason of each QMP SHUTDOWN event until qemu closes the socket."""
    with sock, sock.makefile("rb") as events:
        for line in events:
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict) and message.get("event") == "SHUTDOWN":
                    reasons.append(str(message.get("data", {}).get("reason", "")))


_LIBC = ctypes.CDLL(None)  # loaded here: between fork and exec only the call is made


def _die_with_parent() -> None:
    """In the qemu child: get SIGKILL when imgbase dies, however it dies (no strays)."""
    pr_set_pdeathsig = 1
    _LIBC.prctl(pr_set_pdeathsig, signal.SIGKILL)


def preflight(spec: VmSpec) -> None:
    if shutil.which(QEMU) is None:
        die(f"{QEMU} is not installed", hint="apt-get install qemu-system-x86 (or make setup)")
    if shutil.which("qemu-img") is None:
        die("qemu-img is not installed", hint="apt-get install qemu-utils (or make setup)")
    if bool(spec.live) == bool(spec.disk):
        die("give exactly one of --live IMAGE.squashfs or --disk DISK",
            hint="imgbase vm --live out/imgbase-node-1.0-1.squashfs")
    if spec.live:
        check_squashfs(spec.live)
    if spec.disk:
        check_bootable_disk(spec.disk)
    for path in spec.attach:
        if not path.is_file():
            die(f"{path}: no such disk image to attach", hint="create it with qemu-img create")
    if spec.guestfwd and shutil.which("socat") is None:
        die("socat is not installed (qemu runs one per forwarded guest connection)",
            hint="apt-get install socat (or make setup)")
    if spec.firmware not in FIRMWARE:
        die(f"firmware {spec.firmware!r} is not one of {', '.join(FIRMWARE)}",
            hint="--firmware bios (the default), uefi or secureboot")
    fw = FIRMWARE[spec.firmware]
    if fw is not None:
        for path in (fw.code, fw.vars):
            if not path.is_file():
                die(f"{path} is missing: --firmware {spec.firmware} needs Debian's OVMF",
                    hint="apt-get install ovmf (or make setup)")
    if spec.port is not None and not port_is_free(spec.port):
        die(f"port {spec.port} on 127.0.0.1 is busy", hint="omit --port to pick a free one")


def check_squashfs(path: Path) -> None:
    if not path.is_file():
        die(f"{path}: no such image", hint="compose one with: imgbase compose images/node.toml")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"hsqs":
        die(f"{path} is not a squashfs image", hint="give the .squashfs written by imgbase compose")
    proc = squashfs.readable(path)
    if proc.returncode != 0:
        die(f"{path} is a corrupt squashfs: {(proc.stderr or proc.stdout).strip()[-200:]}",
            hint="compose it again (imgbase compose --rebuild)")


def image_format(path: Path) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


def check_bootable_disk(path: Path) -> None:
    """The disk must carry a boot sector (0x55AA) for the BIOS to boot it."""
    if not path.is_file():
        die(f"{path}: no such disk image", hint="install one with imgbase install")
    with tempfile.TemporaryDirectory() as tmp:
        sector = Path(tmp) / "mbr"
        proc = run(["qemu-img", "dd", "-f", image_format(path), "-O", "raw", "bs=512",
                    "count=1", f"if={path}", f"of={sector}"], check=False)
        data = sector.read_bytes() if sector.exists() else b""
    if proc.returncode != 0 or len(data) < 512 or data[510:512] != b"\x55\xaa":
        die(f"{path} is not a bootable disk image (no boot sector)",
            hint="boot an installed disk, or use --live for a squashfs image")


def extract_boot_files(image: Path, dest: Path) -> tuple[Path, Path]:
    """Kernel and initramfs of the newest kernel in the image's /boot."""
    boot = dest / "live-boot"
    if boot.exists():
        shutil.rmtree(boot)
    proc = run(list(squashfs.unpack_argv(image, boot, "/boot")), check=False)
    kernels = sorted((boot / "boot").glob("vmlinuz-*")) if proc.returncode == 0 else []
    if not kernels:
        die(f"{image} has no kernel in /boot",
            hint="is it a node image composed by imgbase? "
            + (proc.stderr.strip()[-200:] if proc.returncode else ""))
    kernel = kernels[-1]
    initrd = kernel.with_name("initrd.img-" + kernel.name.removeprefix("vmlinuz-"))
    if not initrd.exists():
        die(f"{image}: kernel {kernel.name} has no initramfs", hint="compose the image again")
    return kernel, initrd


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
