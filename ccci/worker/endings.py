"""Endings: the one place where a run's fate is sealed — and decided, when its harness could not.

Every run ends here, exactly once: ``finalize`` records the final state and report and enqueues
what is said on the forge in one transaction, and only from an active state, so a second ending
of the same run changes nothing. The harness decides the verdict of every run it reported
(``harness/run.py: verdict_of``); this module decides the rest, the runs without a report:

    never started   closed PR, canceled while queued, refused by the dispatcher,
                    the forge's permanent answer at admission           ─▶ without_running
    harness gone    killed, crashed, its build vanished                  ─▶ error, "interrupted"
      …before it began its pipeline (nothing ran)                        ─▶ queued again
      …killed by the worker past RUN_TIMEOUT + RUN_GRACE                 ─▶ timed_out
      …after a cancel was asked for                                      ─▶ canceled
    harness stopped by its worker's death (a report saying canceled,
    though nobody asked)                                                 ─▶ canceled, "interrupted"
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import logs
from ..config import Settings
from ..dispatch import Finished
from ..errors import ForgeError
from ..pipeline.report import Report
from ..reporter import Reporter
from ..store import ACTIVE_STATES, FINAL_STATES, Run, Store

log = logging.getLogger(__package__)  # one component for the operator: ccci.worker

INTERRUPTED = "interrupted: {reason}; {cleanup}. Comment `{trigger}` to run it again."
CLEANED = "its app, lock and ABRA_DIR were cleaned up"


class Endings:
    """Seals each run's end: its report (deciding it when the harness left none) and what the forge hears."""

    def __init__(self, settings: Settings, store: Store, reporter: Reporter, forge: Any):
        self.settings = settings
        self.store = store
        self.reporter = reporter
        self.forge = forge

    def harness_ended(self, run: Run, finished: Finished) -> None:
        """End a run whose harness ended: with its report, or with the verdict decided here."""
        if finished.requeue and not run.cancel_requested:
            # Its harness stopped before the pipeline began (the worker restarted): nothing ran.
            self.requeue(run, finished.reason)
            return
        self.finalize(run, self.report_of(run, finished))

    def report_of(self, run: Run, finished: Finished) -> Report:
        """Return the run's final report: the harness' own, or one for the ways it left none."""
        report = finished.report
        cleanup = finished.cleanup or CLEANED
        trigger = self.settings.TRIGGER
        if report is None and finished.timed_out:
            return self._stopped(run, "timed_out", f"timed out: {finished.reason}; {cleanup}.")
        if report is None and run.cancel_requested:
            return self._stopped(run, "canceled", f"canceled: {finished.reason}; {cleanup}.")
        if report is None:
            note = INTERRUPTED.format(reason=finished.reason, cleanup=cleanup, trigger=trigger)
            return self._stopped(run, "error", note)
        if report.status == "canceled" and not run.cancel_requested:
            # Nobody asked: the harness was stopped by its parent's death (a worker restart),
            # and tore down itself before it wrote this report.
            note = INTERRUPTED.format(reason=finished.reason, cleanup="its own teardown ran", trigger=trigger)
            report.notes.insert(0, note)
        return report

    def without_running(self, run: Run, status: str, note: str, *, tell_forge: bool = True) -> None:
        """End a run that never ran, with ``note`` saying why (as its report and the run's note)."""
        self.finalize(run, self._stopped(run, status, note), note=note, tell_forge=tell_forge)

    def finalize(self, run: Run, report: Report, *, note: str | None = None, tell_forge: bool = True) -> None:
        """Record the final state and report and say it on the forge, together and exactly once.

        ``tell_forge`` False keeps the report with ccci (the run page, the admin API): for a pull
        request the forge does not know, whatever is sent would only fail for ever.
        """
        assert report.status in FINAL_STATES
        head_sha = self._head_sha(run) if run.sha and tell_forge else None
        with self.store.transaction():
            changes: dict[str, Any] = {"state": report.status, "report": report.to_dict(), "finished_at": time.time()}
            if note is not None:
                changes["note"] = note
            if not self.store.update_run(run.id, only_if_state=ACTIVE_STATES, **changes):
                return  # finished already: exactly one final report
            if tell_forge:
                ended = self.store.get_run(run.id)
                assert ended is not None
                self.reporter.final(ended, report, head_sha)
        logs.for_run(log, run.id).info("finished: %s", report.status)

    def requeue(self, run: Run, why: str) -> None:
        """Put a running run that never began back in the queue: it will simply start again."""
        logs.for_run(log, run.id).info("queued again: %s", why)
        self.store.update_run(run.id, only_if_state=("running",), state="queued", started_at=None, dispatch_ref=None)

    def _stopped(self, run: Run, status: str, note: str) -> Report:
        return Report.stopped(run=run.id, recipe=run.recipe, sha=run.sha or "", status=status, note=note)

    def _head_sha(self, run: Run) -> str | None:
        """Read the PR head again, so the report can say when it tested an older commit (stale)."""
        try:
            return self.forge.get_pull(run.owner, run.repo, run.pr).head_sha
        except ForgeError as exc:
            logs.for_run(log, run.id).warning("could not re-read the PR head: %s", exc)
            return None
