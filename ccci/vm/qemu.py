"""The QEMU executor: every machine is a copy-on-write fork of a warm base microVM.

    QemuExecutor ── boot() ──▶ QemuMachine (a fork of the warm base, owns its QEMU and files)
                                   │ checkpoint()
                                   ▼
                               QemuCheckpoint ── fork() ──▶ QemuMachine (a fork of that state)

A machine owns ``STATE_DIR/vm/fork-<pid>-<entropy>/`` (its disk overlay) and one QEMU process;
``close`` kills the process and removes the directory on every path, and ``sweep`` is the safety
net when the owner was killed before it could. Its log stays in ``STATE_DIR/vm/logs/``.

Docker machines (images marked ``heavy``) take a host-wide Docker slot first (``slots.py``),
and a fork of a warm base is pointed at the registry mirror, when one is configured, before
its first step.

Supervision: starting a fork (restore, start, agent ready, workspace copy) is retried
``retries`` times on transient failures, and the count reaches the step as ``infra_retries``.
A machine that dies, or does not stop a killed command within ``kill_grace``, is killed and
its step raises an InfraError; a command that merely fails is an ExecResult.
"""

from __future__ import annotations

import io
import logging
import os
import shlex
import shutil
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..config import Settings
from ..errors import InfraError, PermanentInfraError, TransientInfraError
from ..pipeline.executor import ARTIFACTS, TIMEOUT_EXIT, ExecRequest, ExecResult
from .agent import AgentLost, AgentRefused
from .extras import ImageExtras
from .host import Accel, detect_accel, qemu_binary
from .image import ImageInfo, find_image
from .instance import Layout, Vm
from .network import guest_registry_url
from .owner import claim, new_tag
from .slots import RunSlot, slot_count
from .snapshot import Snapshot, logs_dir, overlay, restore, save, vm_dir, warm_base

log = logging.getLogger(__name__)
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
READY_TIMEOUT = 60.0  # restore + first answer; ~0.5 s (tiny) to ~3 s (docker) on an idle TCG host
MIRROR_TIMEOUT = 120.0  # a fork's dockerd taking the registry mirror: a few seconds under TCG
COPY_OUT_LIMIT = 128 << 20  # bytes of artifact archive taken out of a machine


class QemuExecutor:
    """Runs machines as copy-on-write microVM forks of a cached warm base per image and setup."""

    name = "qemu"
    isolated_forks = True

    def __init__(
        self,
        state_dir: Path,
        *,
        image: str = "tiny",
        setup: str = "",
        memory_mb: int = 0,
        tb_size_mb: int = Settings.VM_TB_SIZE_MB,
        retries: int = 2,
        kill_grace: float = 30.0,
        accel: Accel | None = None,
        log: Callable[[str], None] | None = None,
        registry_mirror: str = "",
        preload: tuple[Path, ...] = (),
        extras: ImageExtras | None = None,
        slots: int = 0,
        on_wait: Callable[[str], None] | None = None,
        interrupted: Callable[[], bool] | None = None,
        artifacts_dir: Path | None = None,
    ):
        """Prepare an executor; nothing boots until the first machine is asked for.

        ``memory_mb`` 0 means the image's own default. ``registry_mirror`` is REGISTRY_MIRROR as
        configured (host side); ``preload`` are archives loaded into the Docker warm base;
        ``extras`` are the image additions the configuration asks for (an image built with
        other ones is refused). ``slots`` caps Docker runs host-wide (0: one per core);
        ``on_wait`` hears about waiting for a slot and ``interrupted`` ends that wait.
        """
        self.state_dir = Path(state_dir).resolve()
        # Where machines bring their workspace's artifacts out to, one subdirectory each; the
        # harness owns it and reads it with care (harness/artifacts.py). None: nothing comes out.
        self.artifacts_dir = artifacts_dir
        self.image = image
        self.setup = setup
        self.memory_mb = memory_mb
        self.tb_size_mb = tb_size_mb
        self.retries = retries
        self.kill_grace = kill_grace
        self.accel = accel or detect_accel()
        self.log = log or (lambda _msg: None)
        self.mirror_url = guest_registry_url(registry_mirror) if registry_mirror else ""
        self.preload = tuple(Path(p) for p in preload)
        self.extras = extras
        self.slot = RunSlot(vm_dir(self.state_dir) / "slots", slot_count(slots), on_wait or self.log, interrupted)
        self._bases: dict[str, Snapshot] = {}
        self._lock = threading.Lock()

    @property
    def own_swarm(self) -> bool:
        """Whether each machine runs a swarm of its own (the docker image): an app deployed there is the machine's."""
        info = find_image(self.image, self.state_dir)
        return info is not None and info.heavy

    def warm_base(self, image: str | None = None) -> Snapshot:
        """Return the warm base of ``image``, booting and saving it on first use."""
        name = image or self.image
        with self._lock:
            if name in self._bases:
                return self._bases[name]
            if qemu_binary() is None:
                raise PermanentInfraError("qemu-system-x86_64 is not installed")
            info = find_image(name, self.state_dir)
            if info is None:
                raise PermanentInfraError(
                    f"guest image {name!r} is not built in {self.state_dir}; run: python -m ccci image build {name}"
                )
            self._check_extras(info)
            layout = Layout(info, self.accel, self.memory_mb or info.memory_mb, self.tb_size_mb)
            preload = self.preload if info.heavy else ()
            base = self._retrying(lambda: warm_base(layout, self.setup, self.state_dir, self.log, preload))[0]
            self._bases[name] = base
            return base

    def _check_extras(self, info: ImageInfo) -> None:
        if self.extras is None or not info.heavy:
            return  # tiny takes no extras; without a configuration to compare, the image is as built
        wanted = self.extras.digest()
        if info.extras != wanted:
            raise PermanentInfraError(
                f"the {info.name} image was built with other IMAGE_FILES/IMAGE_PACKAGES than configured; "
                f"run: python -m ccci image build {info.name}"
            )

    def boot(self, workspace: Path, image: str | None = None) -> QemuMachine:
        """Fork a machine from the warm base of ``image`` with a copy of ``workspace`` inside."""
        base = self.warm_base(image)
        return self.fork_from(base, Path(workspace).resolve())

    def fork_from(self, source: Snapshot, workspace: Path | None) -> QemuMachine:
        """Start a fork of ``source``, retrying transient failures; copy ``workspace`` in."""
        machine, retries = self._retrying(lambda: QemuMachine.start(self, source, workspace))
        machine.boot_retries = retries
        return machine

    def _retrying(self, attempt: Callable):
        failures: list[str] = []
        for n in range(self.retries + 1):
            try:
                return attempt(), n
            except TransientInfraError as exc:
                failures.append(str(exc))
                self.log(f"transient infrastructure failure (attempt {n + 1}/{self.retries + 1}): {exc}")
        raise TransientInfraError(
            f"could not provide a machine after {self.retries + 1} attempts; last: {failures[-1]}"
        )


class QemuMachine:
    """One running fork: its QEMU process, its disk overlay and its pin on the state it came from."""

    def __init__(self, executor: QemuExecutor, source: Snapshot, workspace: Path | None):
        self.executor = executor
        self.source = source
        self.workspace = workspace
        self.name = new_tag("fork")
        self.dir = vm_dir(executor.state_dir) / self.name
        logs = logs_dir(executor.state_dir)
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{self.name}.log"
        self.boot_retries = 0
        self.vm: Vm | None = None
        self._slotted = False
        self._pin: int | None = None
        self._lock = threading.Lock()
        self._active = 0
        self._closed = False
        self._disk_generation = 0

    @classmethod
    def start(cls, executor: QemuExecutor, source: Snapshot, workspace: Path | None) -> QemuMachine:
        """Restore a fork of ``source`` and make it ready; on any failure free what was made."""
        machine = cls(executor, source, workspace)
        try:
            machine._start()
        except BaseException:
            machine.close()
            raise
        return machine

    def _start(self) -> None:
        image = self.source.layout.image
        if image.heavy:
            self.executor.slot.hold()
            self._slotted = True
        started = time.monotonic()
        self.dir.mkdir(parents=True)
        claim(self.dir)
        self._pin = self.source.pin()
        overlay(self.source.disk, self.dir / "disk.qcow2")
        argv = self.source.layout.argv(self.source.mem, shared=False, disk=self.dir / "disk.qcow2", incoming=True)
        self.vm = Vm(self.name, argv, self.log_path)
        try:
            restore(self.vm, self.source.state, device_only=True)
            self.vm.agent.setup(hostname=self.name, timeout=READY_TIMEOUT)
        except AgentLost as exc:
            raise TransientInfraError(f"{self.name}: the agent never became ready: {exc}") from None
        self.started_s = time.monotonic() - started
        if image.mirror and self.executor.mirror_url and self.source.is_base:
            self._set_mirror(image.mirror, self.executor.mirror_url)
        if self.workspace is not None:
            self._copy_in(self.workspace)

    def _set_mirror(self, command: str, url: str) -> None:
        """Point the fork's dockerd at the registry mirror (a SIGHUP reload, not a restart)."""
        errors: list[bytes] = []
        outcome = self._run(
            f"{command} {shlex.quote(url)}", "/", GUEST_ENV,
            on_output=lambda _s, chunk: errors.append(chunk), timeout=MIRROR_TIMEOUT,
        )  # fmt: skip
        if outcome.status != 0:
            detail = b"".join(errors)[-500:].decode(errors="replace")
            raise TransientInfraError(f"{self.name}: setting the registry mirror {url} failed: {detail}")

    # -- running commands ---------------------------------------------------------------------

    def exec(self, request: ExecRequest) -> ExecResult:
        """Run one command in the workspace, streaming its output; safe to call from threads."""
        with self._lock:
            if self._closed or self.vm is None:
                raise PermanentInfraError(f"{self.name} is closed")
            self._active += 1
            retries, self.boot_retries = self.boot_retries, 0
        try:
            cwd = str(self.workspace) if self.workspace is not None else "/"
            outcome = self._run(
                request.command, cwd, {**GUEST_ENV, **request.env},
                on_output=request.on_output, timeout=request.timeout, cancel=request.cancel,
            )  # fmt: skip
        finally:
            with self._lock:
                self._active -= 1
        if outcome.timed_out:
            return ExecResult(TIMEOUT_EXIT, timed_out=True, infra_retries=retries)
        return ExecResult(outcome.status, canceled=outcome.canceled, infra_retries=retries)

    def _run(self, command: str, cwd: str, env: dict[str, str], **kwargs):
        vm = self.vm
        assert vm is not None
        try:
            return vm.agent.run(command, cwd, env, kill_grace=self.executor.kill_grace, **kwargs)
        except AgentRefused as exc:
            raise TransientInfraError(str(exc)) from None
        except AgentLost as exc:
            # The machine is gone or hung: kill it so nothing waits on it again.
            alive = vm.alive()
            vm.kill()
            detail = f"{exc} (QEMU {'hung and was killed' if alive else 'exited'}; log: {self.log_path})"
            if not exc.started:
                raise TransientInfraError(detail) from None
            raise PermanentInfraError(f"the machine was lost during the step: {detail}") from None

    def _copy_in(self, workspace: Path) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            tar.add(workspace, arcname=".")
        target = shlex.quote(str(workspace))
        errors: list[bytes] = []
        outcome = self._run(
            f"mkdir -p {target} && tar -xf - -C {target}", "/", GUEST_ENV,
            stdin=buf.getvalue(), on_output=lambda _s, chunk: errors.append(chunk), timeout=READY_TIMEOUT,
        )  # fmt: skip
        if outcome.status != 0:
            raise TransientInfraError(f"{self.name}: copying the workspace in failed: {b''.join(errors)[-500:]!r}")

    def _bring_out_artifacts(self) -> None:
        """Copy what steps left in ``<workspace>/.ccci/artifacts`` out to the executor's artifacts_dir.

        Each machine gets its own subdirectory there, so forks of one run ("deploy once, test
        many") can each leave their own reports. Never into the host's workspace: that is the
        PR's directory, and a symlink committed there would aim the copy anywhere. Closing must
        not fail over it: problems are logged.
        """
        if self.workspace is None or self.vm is None or self.executor.artifacts_dir is None:
            return
        guest_dir = str(self.workspace / ARTIFACTS)
        try:
            probe = self._run(f"test -d {shlex.quote(guest_dir)}", "/", GUEST_ENV, on_output=lambda *_: None)
            if probe.status == 0:
                self.copy_out(guest_dir, self.executor.artifacts_dir / self.name)
        except Exception as exc:  # a dead or hung machine has no artifacts to give
            log.warning("%s: artifacts not copied out: %s", self.name, exc)

    def copy_out(self, guest_dir: str, host_dir: Path, limit: int = COPY_OUT_LIMIT) -> None:
        """Copy the guest directory ``guest_dir`` into ``host_dir``: its directories and regular files only.

        At most ``limit`` bytes of archive are taken; links, devices and FIFOs are left behind.
        """
        chunks: list[bytes] = []
        errors: list[bytes] = []
        size = 0

        def collect(stream: str, chunk: bytes) -> None:
            nonlocal size
            if stream != "stdout":
                errors.append(chunk)
            elif size < limit:
                chunks.append(chunk[: limit - size])
                size += len(chunk)

        outcome = self._run(f"tar -cf - -C {shlex.quote(guest_dir)} .", "/", GUEST_ENV, on_output=collect)
        if outcome.status != 0:
            raise PermanentInfraError(f"{self.name}: cannot read {guest_dir}: {b''.join(errors)[-500:]!r}")
        if size >= limit:
            log.warning("%s: artifacts over %d bytes; the rest stayed in the machine", self.name, limit)
        host_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
            try:
                tar.extractall(host_dir, filter=_plain_members)
            except tarfile.ReadError:  # cut at the limit: what was read before the cut stays
                pass

    def ping(self) -> float:
        """Round-trip one message through the guest agent; return the seconds it took."""
        assert self.vm is not None
        return self.vm.agent.ping(timeout=READY_TIMEOUT)

    @property
    def pid(self) -> int | None:
        """The QEMU process id, for memory accounting."""
        return self.vm.pid if self.vm is not None else None

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint(self) -> QemuCheckpoint:
        """Freeze this machine's current state (it must be idle) so that forks can start from it."""
        with self._lock:
            if self._closed or self.vm is None:
                raise PermanentInfraError(f"{self.name} is closed")
            if self._active:
                raise RuntimeError(f"{self.name}: a checkpoint needs an idle machine ({self._active} running)")
            self._active += 1  # no exec may start while the state is being saved
        directory = vm_dir(self.executor.state_dir) / new_tag("ckpt")
        try:
            directory.mkdir()
            claim(directory)
            self._save_into(directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            with self._lock:
                self._active -= 1
        return QemuCheckpoint(self.executor, Snapshot(directory, self.source.layout), self.workspace)

    def _save_into(self, directory: Path) -> None:
        vm = self.vm
        assert vm is not None
        # The disk: switch this machine to a new overlay; the old one is now frozen and becomes
        # the checkpoint's disk (a hard link keeps it when this machine's directory goes).
        self._disk_generation += 1
        frozen = self._current_disk()
        vm.qmp.execute("stop")
        try:
            fresh = self.dir / f"disk.{self._disk_generation}.qcow2"
            vm.qmp.execute("blockdev-snapshot-sync", device="data", format="qcow2",
                           **{"snapshot-file": str(fresh)})  # fmt: skip
            os.link(frozen, directory / "disk.qcow2")
            # The RAM: a fork's RAM is a private mapping, so it travels in the stream. A helper
            # QEMU loads that stream into a shared RAM file and saves device state only, which
            # gives the checkpoint the same copy-on-write shape as a warm base.
            full = directory / "full.state"
            save(vm, full, device_only=False)
        finally:
            vm.qmp.execute("cont")
        _materialise(self.source.layout, directory, full, self.log_path)
        full.unlink()
        (directory / "pin").touch()
        for part in ("mem", "state", "disk.qcow2"):
            (directory / part).chmod(0o444)

    def _current_disk(self) -> Path:
        if self._disk_generation <= 1:
            return self.dir / "disk.qcow2"
        return self.dir / f"disk.{self._disk_generation - 1}.qcow2"

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Bring artifacts out, kill QEMU, drop the pin on the base and remove this machine's files; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._bring_out_artifacts()
            if self.vm is not None:
                self.vm.kill()
        finally:
            if self._pin is not None:
                os.close(self._pin)
                self._pin = None
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._slotted:
                self._slotted = False
                self.executor.slot.drop()

    def __enter__(self) -> QemuMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A safety net for owners that forget: never leave a QEMU behind a collected object.
        if not getattr(self, "_closed", True):
            self.close()


def _plain_members(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """Keep directories and regular files (checked by tarfile's own ``data`` filter); skip the rest."""
    if not (member.isreg() or member.isdir()):
        return None
    try:
        return tarfile.data_filter(member, dest)
    except tarfile.FilterError:  # an absolute or escaping path: left behind like a link
        return None


def _materialise(layout: Layout, directory: Path, full: Path, log_path: Path | None) -> None:
    """Turn a full migration stream into a shared RAM file plus device state (see _save_into)."""
    helper_disk = directory / "helper.qcow2"
    overlay(directory / "disk.qcow2", helper_disk)
    name = f"{directory.name}-helper"
    log = log_path or (directory / "helper.log")
    vm = Vm(name, layout.argv(directory / "mem", shared=True, disk=helper_disk, incoming=True), log)
    try:
        restore_paused(vm, full)
        save(vm, directory / "state", device_only=True)
    finally:
        vm.kill()
        helper_disk.unlink(missing_ok=True)


def restore_paused(vm: Vm, state: Path) -> None:
    """Load a full state into a QEMU started with ``-incoming defer``, leaving it paused."""
    vm.qmp.handshake()
    vm.qmp.execute("migrate-incoming", uri=f"exec:cat {shlex.quote(str(state))}")
    vm.qmp.wait_status(("inmigrate",), timeout=120)


class QemuCheckpoint:
    """A frozen copy of a running fork; each ``fork`` starts a new machine from it."""

    def __init__(self, executor: QemuExecutor, snapshot: Snapshot, workspace: Path | None):
        self.executor = executor
        self.snapshot = snapshot
        self.workspace = workspace
        self._closed = False

    def fork(self) -> QemuMachine:
        """Start a new machine from this state (its workspace is already inside)."""
        if self._closed:
            raise PermanentInfraError(f"checkpoint {self.snapshot.dir.name} is closed")
        machine = self.executor.fork_from(self.snapshot, None)
        machine.workspace = self.workspace
        return machine

    def close(self) -> None:
        """Remove the checkpoint's files; forks already running keep their open mappings."""
        if not self._closed:
            self._closed = True
            shutil.rmtree(self.snapshot.dir, ignore_errors=True)

    def __enter__(self) -> QemuCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["InfraError", "QemuCheckpoint", "QemuExecutor", "QemuMachine"]
