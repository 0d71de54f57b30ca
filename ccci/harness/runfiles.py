"""A run's own directory: what the harness writes and the web and worker read.

STATE_DIR/runs/<id>/
├── log            every step's output as it comes, redacted, prefixed by step name
├── events.jsonl   one JSON event a line: queued, started, finished (live progress)
├── report.json    the final typed report, written once, atomically
├── began          present once the harness started the pipeline: a run whose harness died
│                  before that never ran a step, and may simply be started again
├── artifacts/     files the steps left in .ccci/artifacts, checked and redacted
└── abra/          the run's ABRA_DIR (see harness.abradir), gone after teardown
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOG_PAGE = 1 << 20


class RunFiles:
    """The files of one run; safe to read while the run is writing them."""

    def __init__(self, runs_dir: Path, run_id: int | str):
        self.dir = Path(runs_dir) / str(run_id)
        self.log = self.dir / "log"
        self.events = self.dir / "events.jsonl"
        self.report = self.dir / "report.json"
        self.artifacts = self.dir / "artifacts"
        self.began = self.dir / "began"

    def create(self) -> None:
        """Make the directory."""
        self.dir.mkdir(parents=True, exist_ok=True)

    def mark_began(self) -> None:
        """Record that the pipeline is about to start: from here on a step may have run."""
        self.began.touch()

    def has_begun(self) -> bool:
        """Tell whether the harness ever started this run's pipeline."""
        return self.began.exists()

    def scrub(self, redact_bytes: Callable[[bytes], bytes]) -> list[str]:
        """Redact every file the run left (log, events, report, artifacts) in place; return those changed.

        The harness redacts what it writes with the secrets it holds; the worker, which holds
        them all (the webhook secret and the admin token never reach a harness), goes over the
        files once more when the run has ended.
        """
        changed = []
        for path in sorted(p for p in self.dir.rglob("*") if p.is_file() and not p.is_symlink()):
            data = path.read_bytes()
            clean = redact_bytes(data)
            if clean != data:
                tmp = path.with_name(path.name + ".scrub")
                tmp.write_bytes(clean)
                os.replace(tmp, path)
                changed.append(str(path.relative_to(self.dir)))
        return changed

    def abra_dir_exists(self) -> bool:
        """Tell whether the run's ABRA_DIR (or its owner file) is still there."""
        return (self.dir / "abra").exists() or (self.dir / "abra-owner.json").exists()

    def write_report(self, report: dict[str, Any]) -> None:
        """Write the report atomically: readers see the old file or the whole new one."""
        tmp = self.report.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, self.report)

    def read_report(self) -> dict[str, Any] | None:
        """Return the report, or None before it exists."""
        try:
            return json.loads(self.report.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def append_event(self, event: dict[str, Any]) -> None:
        """Append one progress event."""
        with self.events.open("a") as f:
            f.write(json.dumps(event) + "\n")

    def read_events(self) -> list[dict[str, Any]]:
        """Return every complete event written so far."""
        return self.read_events_from(0)[0]

    def read_events_from(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Return the complete events written after byte ``offset``, and the offset after them."""
        try:
            with self.events.open("rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], offset
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
        events = [json.loads(line) for line in complete.splitlines()]
        return events, offset + len(complete)

    def read_log(self, offset: int = 0, limit: int = LOG_PAGE) -> tuple[str, int]:
        """Return up to ``limit`` bytes of log from ``offset`` and the offset after them."""
        try:
            with self.log.open("rb") as f:
                f.seek(offset)
                chunk = f.read(limit)
        except FileNotFoundError:
            return "", offset
        return chunk.decode("utf-8", "replace"), offset + len(chunk)
