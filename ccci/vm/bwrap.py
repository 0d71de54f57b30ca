"""The process sandbox executor: steps run as local processes in the run's own directory.

    BwrapExecutor.boot(workspace) ─▶ BwrapMachine (workspace IS the given directory)
        exec(request) ─▶ bwrap … [setpriv …] /bin/sh -c <command>     own session + process group
        checkpoint().fork() ─▶ another BwrapMachine on the SAME directory (no isolation)

Each step runs in its own session and process group, so that a timeout or a cancel can stop the
whole tree it started: SIGTERM to the group, SIGKILL after a short grace. A step's background
processes do not outlive it either: when the shell exits, whatever is left of its group is
killed, because in a process sandbox nothing else would ever reap them.

The step is untrusted code, and the ``Confinement`` says what it may touch. Under bubblewrap
the host root is read-only; ``/tmp``, ``/dev`` and ``/proc`` are its own; its own PID, IPC and
UTS namespaces (a process that escapes the group still dies with the sandbox, and none of
ccci's processes can be seen); ``--die-with-parent``; no network unless the pipeline asks for
it. ccci's state directory, lock directory, configuration file and home directory are hidden
(empty), so no step reads the database, a token or another run; writable are the workspace and
the confinement's ``writable`` paths (the run's ABRA_DIR, the configured ones), nothing else.
No capability and no new privilege survives into the step:

* run by an ordinary user, bubblewrap makes a user namespace and drops every capability in it;
* run by root, bubblewrap builds the sandbox with root's rights (it must see everything to
  hide it) and then ``setpriv`` becomes ``Confinement.user`` (``SANDBOX_USER``, nobody by
  default) with no capabilities, no supplementary groups and no_new_privs before the shell
  starts; the workspace and the run's own paths are handed over to that user first. Root's
  files are then as closed to the step as to any other user, and no remount is possible.

The process executor refuses to run when bubblewrap cannot build this sandbox (``use_bwrap``
False is for ccci's own tests of the process plumbing).

Environment: steps do NOT inherit ccci's environment, which holds its tokens. They get
``PATH`` (ccci's, or a standard one), ``HOME``, ``USER``, ``LOGNAME``, ``LANG`` (default
C.UTF-8), ``TZ``, and, for abra, ``SSH_AUTH_SOCK``, ``DOCKER_HOST`` and ``DOCKER_CONFIG`` when
set — then the request's own env on top. Confined by root, ``HOME`` is ``/tmp``.

Forks cannot copy a directory's processes and state cheaply, so ``isolated_forks`` is False and
the scheduler runs ``fork_from`` steps in the parent sandbox one at a time.
"""

from __future__ import annotations

import functools
import itertools
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import PermanentInfraError
from ..pipeline.executor import TIMEOUT_EXIT, ExecRequest, ExecResult

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSED_THROUGH = ("HOME", "USER", "LOGNAME", "TZ", "SSH_AUTH_SOCK", "DOCKER_HOST", "DOCKER_CONFIG")
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
DRAIN = 1.0  # seconds to keep reading pipes after the group is gone (an escaped holder of them)
POLL = 0.05


@dataclass(frozen=True)
class Confinement:
    """What a step in the process sandbox may touch; everything else is read-only or hidden."""

    writable: tuple[Path, ...] = ()  # besides the workspace: the run's ABRA_DIR, configured paths
    hidden: tuple[Path, ...] = ()  # directories emptied, files made unreadable
    owned: tuple[Path, ...] = ()  # the run's own paths, handed over to ``user`` (with the workspace)
    network: bool = False
    user: str = "nobody"  # whom steps run as when ccci itself runs as root

    def account(self) -> tuple[int, int] | None:
        """Return the (uid, gid) steps run as, or None when they keep ccci's own (ccci is not root)."""
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(self.user)
        except KeyError:
            raise PermanentInfraError(f"SANDBOX_USER {self.user!r} is not a user on this host") from None
        if entry.pw_uid == 0:
            raise PermanentInfraError("SANDBOX_USER must not be root: steps would own the host")
        return entry.pw_uid, entry.pw_gid


@functools.cache
def bwrap_usable() -> bool:
    """Return whether bubblewrap can build our sandbox here (user namespaces may be forbidden)."""
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return False
    confinement = Confinement()
    try:
        probe = _bwrap_argv(bwrap, Path("/"), confinement, confinement.account(), "true")
        return subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired, PermanentInfraError):
        return False


def _bwrap_argv(
    bwrap: str, workspace: Path, confinement: Confinement, account: tuple[int, int] | None, command: str
) -> list[str]:
    argv = [bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent"]
    if not confinement.network:
        argv.append("--unshare-net")
    if account is None:
        argv += ["--unshare-user", "--cap-drop", "ALL"]
    else:
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]  # for setpriv, which drops them
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--perms", "1777", "--tmpfs", "/tmp"]
    binds = [Path(p) for p in (workspace, *confinement.writable) if Path(p).exists()]
    emptied = [Path("/tmp")]
    for path in map(Path, confinement.hidden):
        if path.is_dir() and not path.is_symlink():
            emptied.append(path)
        elif path.exists():
            argv += ["--ro-bind", "/dev/null", str(path)]
    if account is not None:
        # A directory the step's user could not pass through (root's home, a 0700 temporary
        # directory) hides nothing it could see anyway: empty it, so that the paths bound
        # below it can be reached, and make their parents passable.
        emptied += _private_ancestors(binds)
    emptied = sorted(set(emptied), key=lambda p: len(p.parts))
    inside = lambda p: any(p != e and p.is_relative_to(e) for e in emptied)  # noqa: E731
    steps = [(len(p.parts), 0, "--tmpfs", p) for p in emptied if p != Path("/tmp") and not inside(p)]
    steps += [(len(p.parts), 0, "--tmpfs", p) for p in emptied if inside(p)]
    if account is not None:
        parents = {a for b in binds for a in b.parents if inside(a)}
        steps += [(len(p.parts), 1, "--dir", p) for p in parents if p not in emptied]
    for _depth, _order, op, path in sorted(steps):  # outer first: a mount point is made passable first
        argv += (["--perms", "0755"] if op == "--dir" else []) + [op, str(path)]
    # Bound after the hiding, so that a workspace inside a hidden directory shows through it.
    for path in binds:
        argv += ["--bind", str(path), str(path)]
    # No --new-session: the sandboxed shell must stay in our process group to be killable as one.
    argv += ["--chdir", str(workspace), "--"]
    if account is not None:
        uid, gid = account
        argv += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all",
                 "--no-new-privs", "--"]  # fmt: skip
    return argv + ["/bin/sh", "-c", command]


def _private_ancestors(paths: list[Path]) -> list[Path]:
    """Return the directories above ``paths`` that other users cannot pass through, outermost first."""
    found = set()
    for path in paths:
        for parent in path.parents:
            try:
                if not os.stat(parent).st_mode & 0o001:
                    found.add(parent)
            except OSError:
                pass
    return sorted(found, key=lambda p: len(p.parts))


def hand_over(path: Path, account: tuple[int, int]) -> None:
    """Make ``path`` and everything below it (never following a symlink) belong to ``account``."""
    uid, gid = account
    os.chown(path, uid, gid, follow_symlinks=False)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


class BwrapExecutor:
    """Provides ProcessMachines: directories on this host, optionally behind bubblewrap."""

    name = "bwrap"
    isolated_forks = False
    own_swarm = False  # steps reach the operator's swarm (through abra's servers), shared by runs

    def __init__(
        self, use_bwrap: bool | None = None, *, grace: float = KILL_GRACE, confinement: Confinement | None = None
    ):
        self.use_bwrap = True if use_bwrap is None else use_bwrap
        self.grace = grace
        self.confinement = confinement or Confinement()
        self.account: tuple[int, int] | None = None
        if self.use_bwrap:
            if not shutil.which("bwrap"):
                raise PermanentInfraError("bubblewrap (bwrap) is not installed: steps cannot be confined")
            if not bwrap_usable():
                raise PermanentInfraError(
                    "bubblewrap cannot build the step sandbox on this host (user namespaces refused?); "
                    "steps will not run unconfined — use EXECUTOR=qemu"
                )
            self.account = self.confinement.account()
        self._ids = itertools.count(1)

    def boot(self, workspace: Path, image: str | None = None) -> BwrapMachine:
        """Return a machine working directly in ``workspace`` (``image`` is ignored)."""
        workspace = Path(workspace).resolve()
        if not workspace.is_dir():
            raise PermanentInfraError(f"workspace {workspace} is not a directory")
        if self.account is not None:
            for path in (workspace, *self.confinement.owned):
                if Path(path).exists():
                    hand_over(Path(path), self.account)
        return BwrapMachine(self, workspace, f"process-{os.getpid()}-{next(self._ids)}")


class BwrapMachine:
    """A workspace directory where step commands run as process groups; closing kills them all."""

    log_path: Path | None = None  # a sandbox has no machine log of its own

    def __init__(self, executor: BwrapExecutor, workspace: Path, name: str):
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
            executor = self.executor
            bwrap = shutil.which("bwrap") or "bwrap"
            argv = _bwrap_argv(bwrap, self.workspace, executor.confinement, executor.account, request.command)
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
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            with self._lock:
                self._procs.discard(proc)

    def _supervise(self, proc: subprocess.Popen, request: ExecRequest) -> ExecResult:
        deadline = time.monotonic() + request.timeout if request.timeout else None
        assert proc.stdout is not None and proc.stderr is not None  # started with PIPE for both
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
        if self.executor.account is not None:
            env["HOME"] = "/tmp"  # root's home is hidden; the step's user has no other
            env["USER"] = env["LOGNAME"] = self.executor.confinement.user
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
    """A 'checkpoint' of a BwrapMachine: it forks machines on the same, shared directory."""

    def __init__(self, machine: BwrapMachine):
        self.machine = machine

    def fork(self) -> BwrapMachine:
        """Return a new machine on the parent's directory."""
        parent = self.machine
        return BwrapMachine(parent.executor, parent.workspace, f"{parent.name}.fork{next(parent._forks)}")

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
