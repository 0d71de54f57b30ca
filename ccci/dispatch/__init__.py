"""Dispatch: where a run's harness executes — a child process here, or a Drone build.

Both dispatchers answer to the worker through the same small interface, ``Dispatcher``. The
harness is the same code in both places; it leaves its progress and its report in the run's
directory (``RunFiles``) and also prints them on stdout as ``::ccci-event <json>`` and
``::ccci-report <json>`` lines, which is how a Drone build's log carries them back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..pipeline.report import Report
from ..store import Run


@dataclass
class Finished:
    """A run whose harness ended: its report if one came back, else why not."""

    run_id: int
    report: Report | None
    reason: str = ""  # when report is None: what happened instead (exit status, build state)
    requeue: bool = False  # no report, and no step ever ran: the run may simply start again
    timed_out: bool = False  # the dispatcher killed it past its hard deadline
    cleanup: str = ""  # when report is None: what was cleaned up after it, or what is left


class Dispatcher(Protocol):
    """What the worker needs from a place that executes runs."""

    poll_interval: float  # how often the worker must call poll() while runs are active

    def start(self, run: Run, record: Callable[[str], object] | None = None) -> str:
        """Start the harness for ``run``; ``record`` its reference (kept in ``runs.dispatch_ref``)
        before the harness can run a step; return the reference."""
        ...

    def active(self) -> set[int]:
        """Return the ids of runs this dispatcher is executing or watching."""
        ...

    def poll(self) -> list[Finished]:
        """Return the runs that ended since the last call (each exactly once)."""
        ...

    def progress(self, run: Run) -> list[dict[str, Any]]:
        """Return the run's progress events so far."""
        ...

    def cancel(self, run: Run) -> bool:
        """Ask the run to stop; it tears down and ends canceled. False if it is not running."""
        ...

    def adopt(self, run: Run) -> None:
        """Watch a run started before a restart of the worker (state running, ``dispatch_ref`` set)."""
        ...

    def sweep(self) -> str:
        """Free what dead runs left where this dispatcher runs them; return a summary for the log."""
        ...
