"""Live progress on a terminal: a line per step start and finish, fed by the scheduler's events.

    12:03:01  ▶ deploy
    12:03:02  ✅ deploy            passed      1.2 s
    12:03:02  ▶ checkout
    12:03:02  ⏭️ smoke             skipped

``TerminalProgress`` prints the scheduler's events (``pipeline/events.py``). With ``show_output`` (or when the
stream is a TTY and ``show_output`` is None) step output lines are echoed, indented.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from .events import Event, StepBoard
from .render import EMOJI, duration, excerpt
from .report import Report


class TerminalProgress:
    """Prints a run's events to a terminal stream; pass an instance as ``on_event``."""

    def __init__(self, stream: TextIO | None = None, *, show_output: bool | None = None):
        self.stream = stream or sys.stderr
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.show_output = tty if show_output is None else show_output
        self.board = StepBoard()
        self._width = 20

    def __call__(self, event: Event) -> None:
        """Print one event."""
        self.board.update(event)
        self._width = max(self._width, len(event.step) + 2)
        stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
        if event.kind == "started":
            self._print(f"{stamp}  ▶ {event.step}")
        elif event.kind == "finished":
            status = event.status or "error"
            code = "" if event.exit_code in (None, 0) else f"  exit {event.exit_code}"
            took = duration(event.duration_ms) if event.duration_ms else ""
            self._print(f"{stamp}  {EMOJI.get(status, '?')} {event.step:<{self._width}}{status:<11} {took}{code}")
        elif event.kind == "output" and self.show_output:
            self._print(f"          {event.step} │ {event.text}")

    def summary(self, report: Report, *, log: Path | None = None, report_file: Path | None = None) -> None:
        """Print the verdict, why it failed (notes, the failing step's last lines) and where its files are."""
        self._print(
            f"{EMOJI[report.status]} {report.recipe}: {report.status.replace('_', ' ')} "
            f"in {duration(report.total_ms)} ({sum(s.status == 'passed' for s in report.steps)}"
            f"/{len(report.steps)} steps passed)"
        )
        for note in report.notes:
            first, *rest = note.rstrip().split("\n")
            self._print(f"  {first}")
            for line in rest:
                self._print(f"    {line}")
        failing = None if report.passed else report.failing_step()
        if failing is not None and excerpt(failing):
            code = "" if failing.exit_code is None else f", exit {failing.exit_code}"
            self._print(f"  last lines of {failing.name} ({failing.status.replace('_', ' ')}{code}):")
            for stream, text in excerpt(failing):
                self._print(f"    {stream}:")
                for line in text.split("\n"):
                    self._print(f"      {line}")
        if log is not None:
            self._print(f"  log:    {log}")
        if report_file is not None:
            self._print(f"  report: {report_file}")

    def _print(self, line: str) -> None:
        print(line.rstrip(), file=self.stream, flush=True)
