"""The harness' wire: how its progress and its report travel, encoded and parsed in one place.

A harness prints, beside its log, one ``::ccci-event <json>`` line per progress event and one
``::ccci-report <json>`` line with its final report; a Drone build's log carries them to the
worker, which parses them back (``dispatch/drone.py``). On this host the same events are in the
run's ``events.jsonl``, which ``ProgressReader`` follows. Dispatch imports this module; the
harness never imports dispatch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..pipeline.report import Report
from .runfiles import RunFiles

EVENT_PREFIX = "::ccci-event "
REPORT_PREFIX = "::ccci-report "


def report_from(data: dict[str, Any] | None) -> Report | None:
    """Return the typed report a harness left (as JSON data), or None when there is none usable."""
    if data is None:
        return None
    try:
        return Report.from_dict(data)
    except (KeyError, TypeError, ValueError):  # a truncated or foreign report is no report
        return None


def event_line(data: dict[str, Any]) -> str:
    """Return the log line that carries one progress event."""
    return EVENT_PREFIX + json.dumps(data) + "\n"


def report_line(data: dict[str, Any]) -> str:
    """Return the log line that carries the run's report."""
    return REPORT_PREFIX + json.dumps(data) + "\n"


def parse_harness_line(line: str) -> tuple[str, dict[str, Any]] | None:
    """Parse a ``::ccci-event``/``::ccci-report`` line into ("event" | "report", data)."""
    for prefix, kind in ((EVENT_PREFIX, "event"), (REPORT_PREFIX, "report")):
        if line.startswith(prefix):
            try:
                data = json.loads(line[len(prefix) :])
            except json.JSONDecodeError:
                return None
            return (kind, data) if isinstance(data, dict) else None
    return None


class ProgressReader:
    """Follows each run's ``events.jsonl``, reading only what was appended since the last look.

    The worker asks for a running run's progress on every pass; rereading and reparsing the
    whole file each time would grow with the run's length.
    """

    def __init__(self, runs_dir: Path):
        self.runs_dir = runs_dir
        self._seen: dict[int, tuple[list[dict[str, Any]], int]] = {}  # run id -> (events, bytes read)

    def progress(self, run_id: int) -> list[dict[str, Any]]:
        """Return the run's progress events so far."""
        events, offset = self._seen.get(run_id, ([], 0))
        new, offset = RunFiles(self.runs_dir, run_id).read_events_from(offset)
        events = events + new if new else events
        self._seen[run_id] = (events, offset)
        return events

    def forget(self, run_id: int) -> None:
        """Drop what is remembered of a finished run."""
        self._seen.pop(run_id, None)
