"""Events: what happens during a run, as it happens — the live-progress wire of the pipeline.

The scheduler emits an ``Event`` for every step queued, started and finished, and one per line
of output; the harness writes them to the run's ``events.jsonl`` (and, under Drone, into the
build log); the worker reads them back and the reporter folds them, with a ``StepBoard``, into
the status comment of a running run. A ``waiting`` event says what the run waits for (a busy
app, a free VM slot).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("queued", "started", "finished", "output", "waiting")


@dataclass
class Event:
    """Something that happened during a run: queued, started, finished, output, waiting."""

    kind: str
    step: str
    at: float  # epoch seconds
    status: str | None = None
    duration_ms: int | None = None
    exit_code: int | None = None
    stream: str | None = None  # output events: "stdout" | "stderr"
    text: str | None = None  # output and waiting events: one line, redacted

    def to_dict(self) -> dict[str, Any]:
        """Return the event as JSON-ready data, without the fields it does not use."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        """Rebuild an event from ``to_dict`` output; unknown keys are ignored."""
        known = {k: data[k] for k in ("kind", "step", "at", "status", "duration_ms", "exit_code", "stream", "text")
                 if k in data}  # fmt: skip
        return cls(**{"step": "", "at": 0.0, **known})


class StepBoard:
    """The live state of every step of a run, as events report it: (name, status, duration_ms)."""

    def __init__(self) -> None:
        self._steps: dict[str, tuple[str, int | None]] = {}
        self.waiting = ""  # what the run waits for, until a step moves again
        self._lock = threading.Lock()

    def update(self, event: Event) -> None:
        """Fold one event into the board."""
        with self._lock:
            if event.kind == "waiting":
                self.waiting = event.text or ""
                return
            if event.kind == "queued":
                self._steps[event.step] = ("queued", None)
            elif event.kind == "started":
                self._steps[event.step] = ("running", None)
            elif event.kind == "finished":
                self._steps[event.step] = (event.status or "error", event.duration_ms)
            else:
                return
            self.waiting = ""

    def rows(self) -> list[tuple[str, str, int | None]]:
        """Return (name, status, duration_ms) per step, in the order the steps were queued."""
        with self._lock:
            return [(name, status, ms) for name, (status, ms) in self._steps.items()]
