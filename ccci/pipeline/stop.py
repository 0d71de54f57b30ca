"""Stop: why a run must stop — set from anywhere, observed by whoever is waiting.

A signal handler, a timer (the deadline), a test or a dispatcher calls ``Stop.request``; nothing
is raised into the code that happens to be running. Whoever waits watches the stop instead: the
scheduler between its ticks, the app-lock wait and git between their polls, the harness between
its phases. The first request decides the verdict and the exit code; later ones are recorded.
Code that observes a stop and must give up raises ``Stopped`` (a plain exception of its own
making, never one thrown in from a handler).

    status      exit code   from
    canceled    143         SIGTERM (a cancel, or the starter's death), or a request in code
    canceled    130         SIGINT
    timed_out   142         the deadline (SIGALRM in the harness, a timer elsewhere)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..errors import CcciError

EXIT_CODES = {"canceled": 143, "timed_out": 142}


@dataclass(frozen=True)
class StopRequest:
    """One request to stop: the run's verdict if it is the first, the exit code, and why."""

    status: str  # "canceled" | "timed_out"
    exit_code: int
    reason: str
    source: str = ""  # the signal's name, when a signal asked


class Stopped(CcciError):
    """Raised by code that saw the run's stop request while it waited (never from a signal handler)."""

    def __init__(self, request: StopRequest):
        super().__init__(request.reason)
        self.request = request


class Stop:
    """The stop switch of one run: requests recorded in order, an Event for waiters, an optional deadline."""

    def __init__(self, deadline: float | None = None):
        self.event = threading.Event()
        self.requests: list[StopRequest] = []
        self._timer: threading.Timer | None = None
        if deadline is not None:
            self.set_deadline(deadline)

    @property
    def first(self) -> StopRequest | None:
        """The request that decides the verdict, or None while the run may go on."""
        return self.requests[0] if self.requests else None

    def request(self, status: str, reason: str, *, exit_code: int | None = None, source: str = "") -> None:
        """Ask the run to stop, from any thread.

        Never from a signal handler: setting the Event takes its lock, which the interrupted thread
        may hold at that moment (the lifetime guard records a signal's request and relays the rest).
        """
        code = EXIT_CODES[status] if exit_code is None else exit_code
        self.requests.append(StopRequest(status, code, reason, source))
        self.event.set()

    def is_set(self) -> bool:
        """Tell whether a stop was requested (the requests decide, before the Event is set)."""
        return bool(self.requests)

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking at once on a stop request; True if one came."""
        return bool(self.requests) or self.event.wait(timeout)

    def check(self) -> None:
        """Raise ``Stopped`` if a stop was requested: for code between two pieces of work."""
        first = self.first
        if first is not None:
            raise Stopped(first)

    def set_deadline(self, seconds: float) -> None:
        """Request ``timed_out`` ``seconds`` from now (a timer thread: for code without a guard)."""
        if seconds <= 0:
            raise ValueError(f"a deadline must be positive, got {seconds}")
        self.cancel_deadline()
        reason = f"the run's deadline of {seconds:g}s passed"
        self._timer = threading.Timer(seconds, self.request, ("timed_out", reason))
        self._timer.daemon = True
        self._timer.start()

    def cancel_deadline(self) -> None:
        """Disarm the deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
