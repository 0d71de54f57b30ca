"""One QEMU process: its command line, its monitor, its agent, its log, and its death.

QEMU is started through ``setpriv --pdeathsig KILL`` so it dies with its owner. The death
signal fires when the *thread* that forked it exits, so every QEMU is forked by one long-lived
spawner thread rather than by whichever worker thread asked for a machine. The monitor and the
agent are pre-connected socketpairs handed to QEMU as file descriptors: no socket files, no
connect race, nothing lost before the guest's first word.
"""

from __future__ import annotations

import queue
import shlex
import signal
import socket
import subprocess
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ..errors import PermanentInfraError, TransientInfraError
from .agent import Agent
from .host import QEMU, Accel, qemu_binary, tsc_khz
from .image import ImageInfo
from .qmp import Qmp

# The device set, as a version: a saved state only loads into a QEMU with the same devices, so
# warm bases are keyed by it. 2: every machine has its own user-mode network.
DEVICES = "2"


@dataclass(frozen=True)
class Layout:
    """What a VM is made of; a base and its forks must agree on all of it but the files.

    ``tb_size_mb`` caps TCG's translation buffer (0: QEMU's default, 1 GiB), which is private
    memory of every QEMU; it is not part of the saved state, so bases and forks may differ in it.
    """

    image: ImageInfo
    accel: Accel
    memory_mb: int
    tb_size_mb: int = 0

    def argv(self, mem_path: Path, shared: bool, disk: Path, incoming: bool) -> list[str]:
        """Return the QEMU command line (without the channel arguments)."""
        cmdline = "console=ttyS0 quiet panic=-1 rdinit=/init"
        if self.accel.name == "tcg":
            # microvm has no PIT speaker, HPET or kvmclock under TCG: without the rate the
            # kernel never calibrates its TSC and the boot hangs.
            cmdline += f" tsc_early_khz={tsc_khz()}"
        argv = [
            QEMU,
            "-M", "microvm,memory-backend=mem",
            *self.accel.qemu_args(self.tb_size_mb),
            "-object",
            f"memory-backend-file,id=mem,size={self.memory_mb}M,mem-path={mem_path},"
            f"share={'on' if shared else 'off'}",
            "-m", f"{self.memory_mb}M", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", cmdline,
            "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
            "-drive", f"if=none,id=data,file={disk},format=qcow2,cache=unsafe",
            "-device", "virtio-blk-device,drive=data",
            # QEMU's user-mode network, private to this process: forks never see each other (the
            # same MAC and 10.0.2.15 in every fork is harmless), the host is 10.0.2.2, and
            # nothing comes in: there is no hostfwd.
            "-netdev", "user,id=net0",
            "-device", "virtio-net-device,netdev=net0",
            "-device", "virtio-serial-device",
        ]  # fmt: skip
        if incoming:
            argv += ["-incoming", "defer"]
        return argv


class _Spawner:
    """The one thread that forks every QEMU, so that PDEATHSIG ties them to the process."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, argv: list[str], **kwargs: object) -> subprocess.Popen:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ccci-vm-spawner", daemon=True)
                self._thread.start()
        done: Future = Future()
        self._requests.put((argv, kwargs, done))
        return done.result()

    def _loop(self) -> None:
        while True:
            argv, kwargs, done = self._requests.get()
            try:
                done.set_result(subprocess.Popen(argv, **kwargs))
            except BaseException as exc:  # handed to the caller, who raises it
                done.set_exception(exc)


_spawner = _Spawner()


class Vm:
    """A running QEMU process with its monitor (``qmp``) and guest agent (``agent``)."""

    def __init__(self, name: str, argv: list[str], log_path: Path):
        self.name = name
        self.log_path = log_path
        if qemu_binary() is None:
            raise PermanentInfraError(f"{QEMU} is not installed")
        agent_host, agent_qemu = socket.socketpair()
        qmp_host, qmp_qemu = socket.socketpair()
        full = [
            "setpriv", "--pdeathsig", "KILL", "--",
            *argv,
            "-chardev", f"socket,id=agent,fd={agent_qemu.fileno()}",
            "-device", "virtserialport,chardev=agent,name=ccci.agent",
            "-chardev", f"socket,id=qmp,fd={qmp_qemu.fileno()}",
            "-mon", "chardev=qmp,mode=control",
        ]  # fmt: skip
        try:
            with log_path.open("ab") as log:
                log.write(f"$ {shlex.join(full)}\n".encode())
                log.flush()
                self.process = _spawner.popen(
                    full,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(agent_qemu.fileno(), qmp_qemu.fileno()),
                    start_new_session=True,  # a terminal's ^C goes to the owner, who decides
                )
        except OSError as exc:
            for s in (agent_host, agent_qemu, qmp_host, qmp_qemu):
                s.close()
            raise TransientInfraError(f"{name}: cannot start QEMU: {exc}") from None
        finally:
            agent_qemu.close()
            qmp_qemu.close()
        self.qmp = Qmp(qmp_host, name)
        self.agent = Agent(agent_host, name)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        """Whether QEMU is still running."""
        return self.process.poll() is None

    def kill(self) -> None:
        """Kill QEMU, reap it and close the channels; safe to call more than once."""
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.agent.close()
        self.qmp.close()

    def log_tail(self, lines: int = 15) -> str:
        """Return the end of this VM's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
