"""Lifetime guard: how a run learns it must stop, and the promise that its teardown finishes.

A run stops early in one of four ways: someone cancels it (SIGTERM; SIGINT from a terminal),
its deadline passes, or the process that started it dies. The last one is the treacherous one:
Drone's exec runner cancels a build by SIGKILLing the step's ``/bin/sh`` only, never its process
group, so without help the harness would run on as an orphan and never tear down. The guard
asks the kernel for SIGTERM when the parent dies (``PR_SET_PDEATHSIG``) and then checks that the
parent is still there, because it may have died before the request was made.

Every way in funnels into ONE exception, raised in the main thread::

    signal                      RunInterrupted.status   exit code
    SIGTERM (or parent died)    canceled                143
    SIGINT                      canceled                130
    SIGALRM (the deadline)      timed_out               142

Only the first signal raises. Every later one, and any signal after ``begin_teardown()``, is
recorded and logged but never raised, so a retried cancel or a second Ctrl-C cannot cut the
teardown short. The first signal still decides the exit code even when it arrives during
teardown: a build canceled while it was cleaning up exits as canceled.

The run becomes its own session (unless it already leads a process group, as a command started
by an interactive shell does), so that signalling the group reaches every child it starts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
from types import FrameType

from ..errors import RunInterrupted

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# signal -> (status, exit code); the exit codes follow the shell's 128 + signal number.
_FUNNEL = {
    signal.SIGTERM: ("canceled", 128 + signal.SIGTERM),
    signal.SIGINT: ("canceled", 128 + signal.SIGINT),
    signal.SIGALRM: ("timed_out", 128 + signal.SIGALRM),
}


class LifetimeGuard:
    """The signal funnel of one run process; see the module docstring. Build it with install_guard."""

    def __init__(self, deadline_seconds: float, parent_pid: int):
        self.deadline_seconds = deadline_seconds
        self.parent_pid = parent_pid
        self.interrupted: RunInterrupted | None = None  # the first stop request, raised or not
        self.signals: list[str] = []  # every signal received, in order, for the report and log
        self._raised = False
        self._teardown_started = False
        self._previous: dict[int, object] = {}

    @property
    def teardown_started(self) -> bool:
        """True once teardown began; nothing new may start after that."""
        return self._teardown_started

    def begin_teardown(self) -> bool:
        """Mark teardown as begun so no later signal raises; return True only on the first call.

        Call it as the first statement of the run's ``finally``. A signal that Python happens to
        handle on entry to this very method is recognised by the handler and treated as arriving
        during teardown (see ``_handle``), so there is no window in which teardown can be skipped.
        """
        first = not self._teardown_started
        self._teardown_started = True
        return first

    def exit_code(self, default: int) -> int:
        """Return the exit code of the first stop request, or ``default`` when there was none."""
        return self.interrupted.exit_code if self.interrupted is not None else default

    def set_deadline(self, seconds: float) -> None:
        """Re-arm the deadline to ``seconds`` from now (e.g. the recipe's own ``timeout``)."""
        if seconds <= 0:
            raise ValueError(f"a deadline must be positive, got {seconds}")
        self.deadline_seconds = seconds
        signal.setitimer(signal.ITIMER_REAL, seconds)

    def uninstall(self) -> None:
        """Disarm the deadline and restore the signal handlers that were there before."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _install(self) -> None:
        if os.getpgid(0) != os.getpid():
            # Not a group leader, so setsid() is allowed; it also detaches from the step shell's
            # group, which Drone never signals anyway. A group leader (an interactive shell's
            # job) keeps its group so that Ctrl-C from the terminal still reaches it.
            os.setsid()
        for signum in _FUNNEL:
            self._previous[signum] = signal.signal(signum, self._handle)
        _set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != self.parent_pid:
            # The parent died before PR_SET_PDEATHSIG was in place: the kernel will never send
            # the signal, so deliver the same verdict ourselves.
            self._handle(signal.SIGTERM, None, reason=f"the parent process {self.parent_pid} is gone")
        signal.setitimer(signal.ITIMER_REAL, self.deadline_seconds)

    def _handle(self, signum: int, frame: FrameType | None, reason: str = "") -> None:
        name = signal.Signals(signum).name
        self.signals.append(name)
        status, code = _FUNNEL[signum]
        if not reason:
            reason = (
                f"the run's deadline of {self.deadline_seconds:g}s passed"
                if signum == signal.SIGALRM
                else f"{name} received"
            )
        if self.interrupted is None:
            self.interrupted = RunInterrupted(status, code, reason)
        # Python runs handlers between bytecodes; one handled at the entry of begin_teardown()
        # belongs to teardown already, so it must not raise out of the caller's finally.
        if frame is not None and frame.f_code is LifetimeGuard.begin_teardown.__code__:
            self._teardown_started = True
        if self._raised or self._teardown_started:
            log.warning("%s during teardown (%s); teardown continues", name, reason)
            return
        self._raised = True
        log.warning("run interrupted: %s", reason)
        raise self.interrupted


def install_guard(deadline_seconds: float, *, parent_pid: int | None = None) -> LifetimeGuard:
    """Install the lifetime guard in this (main) thread; call it first thing in the run process.

    ``parent_pid`` is the pid of the process that started the run, when the starter knows it
    (e.g. from its environment); it defaults to the current parent. Either an armed guard is
    returned or RunInterrupted is raised (the parent is already gone, or a signal came in the
    meantime) and nothing stays installed: no run has started yet, so there is nothing to undo.
    """
    if deadline_seconds <= 0:
        raise ValueError(f"a deadline must be positive, got {deadline_seconds}")
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_guard must run in the main thread: Python delivers signals there only")
    guard = LifetimeGuard(deadline_seconds, os.getppid() if parent_pid is None else parent_pid)
    try:
        guard._install()
    except RunInterrupted:
        guard.uninstall()
        raise
    return guard


def _set_parent_death_signal(signum: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
