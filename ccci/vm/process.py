"""The process sandbox executor: steps run as local processes in the run's own directory.

    ProcessExecutor.boot(workspace) ─▶ ProcessMachine (workspace IS the given directory)
        exec(request) ─▶ [bwrap …] /bin/sh -c <command>     own session + process group
        checkpoint().fork() ─▶ another ProcessMachine on the SAME directory (no isolation)

Each step runs in its own session and process group, so that a timeout or a cancel can stop the
whole tree it started: SIGTERM to the group, SIGKILL after a short grace. A step's background
processes do not outlive it either: when the shell exits, whatever is left of its group is
killed, because in a process sandbox nothing else would ever reap them.

Where bubblewrap works (probed once; ``use_bwrap=None``), the shell runs with the host root
read-only, a fresh /tmp and /dev, its own PID namespace (so a process that escapes the group
still dies with the sandbox) and ``--die-with-parent``. Writable: the workspace, ``ABRA_DIR``
when the step's environment names an existing directory, and ``writable`` paths. The network
is shared: abra must reach its servers.

Environment: steps do NOT inherit ccci's environment, which holds its tokens. They get
``PATH`` (ccci's, or a standard one), ``HOME``, ``USER``, ``LOGNAME``, ``LANG`` (default
C.UTF-8), ``TZ``, and, for abra, ``SSH_AUTH_SOCK``, ``DOCKER_HOST`` and ``DOCKER_CONFIG`` when
set — then the request's own env on top.

Forks cannot copy a directory's processes and state cheaply, so ``isolated_forks`` is False and
the scheduler runs ``fork_from`` steps in the parent sandbox one at a time.
"""

from __future__ import annotations

import functools
import itertools
import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from ..errors import PermanentInfraError
from ..pipeline.executor import TIMEOUT_EXIT, ExecRequest, ExecResult

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSED_THROUGH = ("HOME", "USER", "LOGNAME", "TZ", "SSH_AUTH_SOCK", "DOCKER_HOST", "DOCKER_CONFIG")
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
DRAIN = 1.0  # seconds to keep reading pipes after the group is gone (an escaped holder of them)
POLL = 0.05


@functools.cache
def bwrap_usable() -> bool:
    """Return whether bubblewrap can build our sandbox here (user namespaces may be forbidden)."""
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return False
    probe = _bwrap_argv(bwrap, Path("/"), [], "true")
    try:
        return subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _bwrap_argv(bwrap: str, workspace: Path, writable: Iterable[Path], command: str) -> list[str]:
    argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for path in (workspace, *writable):
        if Path(path).exists():  # a path that does not exist has nothing to protect or share
            argv += ["--bind", str(path), str(path)]
    # No --new-session: the sandboxed shell must stay in our process group to be killable as one.
    return argv + ["--unshare-pid", "--die-with-parent", "--chdir", str(workspace), "/bin/sh", "-c", command]


class ProcessExecutor:
    """Provides ProcessMachines: directories on this host, optionally behind bubblewrap."""

    name = "process"
    isolated_forks = False

    def __init__(self, use_bwrap: bool | None = None, *, grace: float = KILL_GRACE, writable=()):
        self.use_bwrap = bwrap_usable() if use_bwrap is None else use_bwrap
        if self.use_bwrap and not shutil.which("bwrap"):
            raise PermanentInfraError("use_bwrap=True but bwrap is not installed")
        self.grace = grace
        self.writable = tuple(Path(p) for p in writable)
        self._ids = itertools.count(1)

    def boot(self, workspace: Path, image: str | None = None) -> ProcessMachine:
        """Return a machine working directly in ``workspace`` (``image`` is ignored)."""
        workspace = Path(workspace).resolve()
        if not workspace.is_dir():
            raise PermanentInfraError(f"workspace {workspace} is not a directory")
        return ProcessMachine(self, workspace, f"process-{os.getpid()}-{next(self._ids)}")


class ProcessMachine:
    """A workspace directory where step commands run as process groups; closing kills them all."""

    log_path: Path | None = None  # a sandbox has no machine log of its own

    def __init__(self, executor: ProcessExecutor, workspace: Path, name: str):
        self.executor = executor
        self.workspace = workspace
        self.name = name
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._forks = itertools.count(1)

    def exec(self, request: ExecRequest) -> ExecResult:
        """Run ``request.command`` in its own process group and wait for it, streaming output."""
        if self._closed.is_set():
            raise PermanentInfraError(f"machine {self.name} is closed")
        env = self._env(request.env)
        argv = ["/bin/sh", "-c", request.command]
        if self.executor.use_bwrap:
            writable = [*self.executor.writable]
            abra_dir = env.get("ABRA_DIR")
            if abra_dir and Path(abra_dir).is_dir():
                writable.append(Path(abra_dir))
            argv = _bwrap_argv(shutil.which("bwrap") or "bwrap", self.workspace, writable, request.command)
        try:
            proc = subprocess.Popen(
                argv,
                cwd=self.workspace,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise PermanentInfraError(f"cannot start {argv[0]}: {exc}") from exc
        with self._lock:
            self._procs.add(proc)
        try:
            return self._supervise(proc, request)
        finally:
            if proc.returncode is None:  # _supervise raised: still stop and reap the whole group
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            with self._lock:
                self._procs.discard(proc)

    def _supervise(self, proc: subprocess.Popen, request: ExecRequest) -> ExecResult:
        deadline = time.monotonic() + request.timeout if request.timeout else None
        streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        timed_out = canceled = False
        term_at = gone_at = None
        with selectors.DefaultSelector() as sel:
            for fd in streams:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map() or not _exited(proc.pid):
                now = time.monotonic()
                if gone_at is None and _exited(proc.pid):
                    gone_at = now
                    _killpg(proc.pid, signal.SIGKILL)  # background children would hold the pipes
                if gone_at is not None and now - gone_at > DRAIN:
                    break
                if term_at is None:
                    canceled = request.cancel.is_set() or self._closed.is_set()
                    timed_out = not canceled and deadline is not None and now >= deadline
                    if canceled or timed_out:
                        term_at = now
                        _killpg(proc.pid, signal.SIGTERM)
                elif now - term_at > self.executor.grace:
                    _killpg(proc.pid, signal.SIGKILL)
                for key, _ in sel.select(timeout=POLL):
                    data = os.read(key.fd, 65536)
                    if not data:
                        sel.unregister(key.fd)
                    elif request.on_output:
                        request.on_output(streams[key.fd], data)
        # The leader is a zombie until reaped, so its pid (= the group id) cannot be reused yet:
        # killing the group now cannot hit an unrelated process.
        _killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
        if timed_out:
            return ExecResult(TIMEOUT_EXIT, timed_out=True)
        canceled = canceled or self._closed.is_set()  # close() kills without waiting for the loop
        return ExecResult(128 - code if code < 0 else code, canceled=canceled)

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH") or DEFAULT_PATH, "LANG": "C.UTF-8"}
        env.update({k: os.environ[k] for k in PASSED_THROUGH if k in os.environ})
        env.update(extra)
        return env

    def checkpoint(self) -> SharedCheckpoint:
        """Return a checkpoint whose forks share this machine's directory (nothing is copied)."""
        return SharedCheckpoint(self)

    def close(self) -> None:
        """Kill every step still running here; the workspace belongs to the caller and stays."""
        self._closed.set()
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            _killpg(proc.pid, signal.SIGKILL)


class SharedCheckpoint:
    """A 'checkpoint' of a ProcessMachine: it forks machines on the same, shared directory."""

    def __init__(self, machine: ProcessMachine):
        self.machine = machine

    def fork(self) -> ProcessMachine:
        """Return a new machine on the parent's directory."""
        parent = self.machine
        return ProcessMachine(parent.executor, parent.workspace, f"{parent.name}.fork{next(parent._forks)}")

    def close(self) -> None:
        """Nothing to free: a shared checkpoint holds no state of its own."""


def _exited(pid: int) -> bool:
    """Whether the child ``pid`` has exited, without reaping it (WNOWAIT keeps its pid reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone
