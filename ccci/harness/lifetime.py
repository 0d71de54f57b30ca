"""Lifetime guard: how a run process learns it must stop, and the promise that its teardown finishes.

A run stops early in one of four ways: someone cancels it (SIGTERM; SIGINT from a terminal),
its deadline passes, or the process that started it dies. The last one is the treacherous one:
Drone's exec runner cancels a build by SIGKILLing the step's ``/bin/sh`` only, never its process
group, so without help the harness would run on as an orphan and never tear down. The guard
asks the kernel for SIGTERM when the parent dies (``PR_SET_PDEATHSIG``; the local dispatcher
arms it before the harness' first instruction, ``setpriv --pdeathsig``) and then checks that the
parent it was told of is still there, because it may have died before the request was made.

Signals set state; they never raise. Every way in becomes a request on the guard — a ``Stop``
(``pipeline/stop.py``), which the scheduler, the app-lock wait and the checkout watch — and the
first request decides the verdict and the exit code. The handler itself takes no lock: Python runs
it in the main thread between two bytecodes, quite possibly while that thread holds the stop's
Event lock inside ``wait``, and taking that lock again there would hang the run for good. So the
handler only records the request and writes a byte to a pipe; a relay thread reads it, sets the
Event and logs::

    signal                      status       exit code
    SIGTERM (or parent died)    canceled     143
    SIGINT                      canceled     130
    SIGALRM (the deadline)      timed_out    142

The one deadline of the run is this guard's (``set_deadline``: the run's ``RUN_TIMEOUT``, then the
recipe's own ``timeout``). ``shield()`` marks the start of teardown: a signal after it is recorded
and logged, and nobody acts on it, so a retried cancel or a second Ctrl-C cannot cut teardown
short; it still shows in the verdict ("canceled during teardown").

The run becomes its own session (unless it already leads a process group, as a command started
by an interactive shell does), so that signalling the group reaches every child it starts.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import threading
from types import FrameType

from ..pipeline.stop import Stop, StopRequest

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# signal -> (status, exit code); the exit codes follow the shell's 128 + signal number.
_FUNNEL = {
    signal.SIGTERM: ("canceled", 128 + signal.SIGTERM),
    signal.SIGINT: ("canceled", 128 + signal.SIGINT),
    signal.SIGALRM: ("timed_out", 128 + signal.SIGALRM),
}


class LifetimeGuard(Stop):
    """The stop switch of one run process, fed by its signals; see the module docstring."""

    def __init__(self, deadline_seconds: float, parent_pid: int):
        super().__init__()
        self.deadline_seconds = deadline_seconds
        self.parent_pid = parent_pid
        self.shielded = False  # teardown began: later signals are recorded, not acted on
        self._previous: dict[int, object] = {}
        # The handler's side of the relay: what to log (appended in the handler, popped by the
        # relay; deque operations take no lock a handler could deadlock on) and the pipe's ends.
        self._to_log: collections.deque[tuple[str, tuple[str, ...]]] = collections.deque()
        self._wake_read = self._wake_write = -1
        self._relay: threading.Thread | None = None

    @property
    def signals(self) -> list[str]:
        """Every signal received, in order."""
        return [r.source for r in self.requests if r.source]

    def shield(self) -> None:
        """Mark teardown as begun: from now on a stop request changes nothing but the verdict."""
        self.shielded = True

    def exit_code(self, default: int) -> int:
        """Return the exit code of the first stop request, or ``default`` when there was none."""
        first = self.first
        return first.exit_code if first is not None else default

    def set_deadline(self, seconds: float) -> None:
        """Re-arm the run's deadline to ``seconds`` from now (e.g. the recipe's own ``timeout``)."""
        if seconds <= 0:
            raise ValueError(f"a deadline must be positive, got {seconds}")
        self.deadline_seconds = seconds
        signal.setitimer(signal.ITIMER_REAL, seconds)

    def cancel_deadline(self) -> None:
        """Disarm the deadline."""
        signal.setitimer(signal.ITIMER_REAL, 0)

    def uninstall(self) -> None:
        """Disarm the deadline, restore the signal handlers that were there before, end the relay."""
        self.cancel_deadline()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()
        if self._relay is not None:
            # No handler of ours can write any more: closing the write end ends the relay's read,
            # after it has passed on whatever was written before.
            os.close(self._wake_write)
            self._relay.join(timeout=5)
            self._relay = None

    def __enter__(self) -> LifetimeGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _install(self) -> None:
        if os.getpgid(0) != os.getpid():
            # Not a group leader, so setsid() is allowed; it also detaches from the step shell's
            # group, which Drone never signals anyway. A group leader (an interactive shell's
            # job) keeps its group so that Ctrl-C from the terminal still reaches it.
            os.setsid()
        self._wake_read, self._wake_write = os.pipe()  # both close on exec: no step inherits them
        os.set_blocking(self._wake_write, False)  # a handler must never block on a full pipe
        self._relay = threading.Thread(target=self._relay_signals, name="ccci-guard-relay", daemon=True)
        self._relay.start()
        for signum in _FUNNEL:
            self._previous[signum] = signal.signal(signum, self._handle)
        _set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != self.parent_pid:
            # The parent died before PR_SET_PDEATHSIG was in place: the kernel will never send
            # the signal, so the same verdict is recorded here.
            self.request("canceled", f"the parent process {self.parent_pid} is gone", exit_code=143)
        signal.setitimer(signal.ITIMER_REAL, self.deadline_seconds)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        status, code = _FUNNEL[signal.Signals(signum)]
        if signum == signal.SIGALRM:
            reason = f"the run's deadline of {self.deadline_seconds:g}s passed"
        elif os.getppid() != self.parent_pid:
            reason = f"{name} received: the parent process {self.parent_pid} is gone"
        else:
            reason = f"{name} received"
        # Recorded here, at once, so that ``first`` and ``check()`` see it the moment the handler
        # returns; the Event is the relay's to set (see the module docstring).
        self.requests.append(StopRequest(status, code, reason, name))
        if self.shielded:
            self._to_log.append(("%s during teardown (%s); teardown continues", (name, reason)))
        elif len(self.requests) == 1:
            self._to_log.append(("run interrupted: %s", (reason,)))
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups the relay has yet to read: it will see this one too

    def _relay_signals(self) -> None:
        """Set the Event and log for every wake-up the handler wrote, until the pipe is closed."""
        try:
            while os.read(self._wake_read, 512):
                self.event.set()
                while self._to_log:
                    message, words = self._to_log.popleft()
                    log.warning(message, *words)
        finally:
            os.close(self._wake_read)


def install_guard(deadline_seconds: float, *, parent_pid: int | None = None) -> LifetimeGuard:
    """Install the lifetime guard in this (main) thread; call it first thing in the run process.

    ``parent_pid`` is the pid of the process that started the run, when the starter says so
    (``--parent-pid``); it defaults to the current parent. The guard comes back armed; a parent
    already gone shows as its first stop request.
    """
    if deadline_seconds <= 0:
        raise ValueError(f"a deadline must be positive, got {deadline_seconds}")
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_guard must run in the main thread: Python delivers signals there only")
    guard = LifetimeGuard(deadline_seconds, os.getppid() if parent_pid is None else parent_pid)
    guard._install()
    return guard


def _set_parent_death_signal(signum: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
