"""The worker: admits accepted runs, dispatches them, and reports how they ended.

One pass of the loop, in order: handle ``!testme cancel`` requests and admin cancels; admit
new runs (organisation membership, then pin the PR head); start admitted runs while fewer than
``MAX_RUNS`` are going; finish the runs whose harness exited; refresh the status comments of
running runs from their progress events; deliver the outbox. Then wait for the doorbell, or
until the next outbox retry is due.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .config import Settings
from .doorbell import Doorbell
from .errors import ForgeError
from .intake.policy import authorize, refusal_text
from .outbox import Courier
from .reporter import Reporter
from .runfiles import RunFiles
from .store import ACTIVE_STATES, FINAL_STATES, Run, Store

log = logging.getLogger(__name__)

IDLE_WAIT = 5.0  # how long to wait for the doorbell when nothing is due


class Worker:
    """Drives runs from queued to their final report on this host."""

    def __init__(self, settings: Settings, forge: Any, *, store: Store | None = None, dispatcher: Any = None):
        self.settings = settings
        self.forge = forge
        self.store = store or Store(settings.db_path)
        self.reporter = Reporter(self.store, settings)
        self.courier = Courier(self.store, forge)
        self.doorbell = Doorbell(settings.STATE_DIR / "worker.sock")
        if dispatcher is None:
            from .dispatch.local import LocalDispatcher

            dispatcher = LocalDispatcher(settings, self.doorbell)
        self.dispatcher = dispatcher
        self._progress_seen: dict[int, int] = {}
        self._signaled: set[int] = set()  # runs already sent SIGTERM: cancel once, then wait

    def serve(self, stop: threading.Event) -> None:
        """Run passes until ``stop`` is set."""
        self.doorbell.listen()
        try:
            while not stop.is_set():
                wait = self.run_pass()
                self.doorbell.wait(wait)
        finally:
            self.doorbell.close()

    def run_pass(self) -> float:
        """Do one pass of work; return how long the worker may wait before the next."""
        self._handle_cancel_requests()
        self._admit()
        self._cancel_requested()
        self._start()
        self._finish_exited()
        self._refresh_progress()
        next_due = self.courier.deliver_due()
        wait = IDLE_WAIT if not self.dispatcher.running() else 1.0
        if next_due is not None:
            wait = min(wait, max(0.0, next_due - time.time()))
        return wait

    # -- admission -----------------------------------------------------------------------------

    def _admit(self) -> None:
        for run in reversed(self.store.list_runs(states=("queued",), limit=500)):
            if run.admitted:
                continue
            try:
                self._admit_one(run)
            except ForgeError as exc:
                # The forge is down: the run stays unadmitted and is tried again next pass.
                log.warning("admitting run %s: %s", run.id, exc)

    def _admit_one(self, run: Run) -> None:
        if not run.authorized:
            decision = authorize(
                run.requester,
                allowed_users=self.settings.ALLOWED_USERS,
                allowed_orgs=self.settings.ALLOWED_ORGS,
                is_org_member=self.forge.is_org_member,
            )
            if not decision.allowed:
                log.info("run %s refused: %s", run.id, decision.reason)
                self.store.update_run(
                    run.id,
                    only_if_state=("queued",),
                    state="refused",
                    note=decision.reason,
                    finished_at=time.time(),
                )
                self.reporter.refuse(
                    owner=run.owner,
                    repo=run.repo,
                    pr=run.pr,
                    comment_id=run.comment_id or 0,
                    login=run.requester,
                    text=refusal_text(run.requester, self.settings.TRIGGER),
                )
                return
            self.store.update_run(run.id, authorized=1)
            self.reporter.react(run, "eyes")
        pull = self.forge.get_pull(run.owner, run.repo, run.pr)
        if pull.state != "open":
            self._end_without_running(run, "canceled", "the pull request was closed before the run started")
            return
        self.store.update_run(run.id, sha=pull.head_sha, admitted=1)
        run = self.store.get_run(run.id)
        self.reporter.queued(run)
        self.reporter.status(run, "queued", f"run #{run.id} queued")

    # -- cancel --------------------------------------------------------------------------------

    def _handle_cancel_requests(self) -> None:
        for req in self.store.pending_cancel_requests():
            active = [
                r
                for r in self.store.list_runs(states=ACTIVE_STATES, owner=req["owner"], repo=req["repo"], pr=req["pr"])
            ]
            login = req["login"]
            may = any(r.requester.lower() == login.lower() for r in active)
            if not may and active:
                try:
                    may = authorize(
                        login,
                        allowed_users=self.settings.ALLOWED_USERS,
                        allowed_orgs=self.settings.ALLOWED_ORGS,
                        is_org_member=self.forge.is_org_member,
                    ).allowed
                except ForgeError:
                    continue  # the forge is down; decide next pass
            if active and not may:
                self.reporter.refuse(
                    owner=req["owner"],
                    repo=req["repo"],
                    pr=req["pr"],
                    comment_id=req["comment_id"] or 0,
                    login=login,
                    text=refusal_text(login, self.settings.TRIGGER),
                )
            for run in active if may else []:
                self.store.update_run(run.id, only_if_state=ACTIVE_STATES, cancel_requested=1, canceled_by=login)
            if may or not active:
                self.reporter._react(req["owner"], req["repo"], req["comment_id"], "+1" if active else "confused")
            self.store.mark_cancel_request_handled(req["id"])

    def _cancel_requested(self) -> None:
        for run in self.store.list_runs(states=ACTIVE_STATES, limit=500):
            if not run.cancel_requested:
                continue
            if run.state == "queued":
                self._end_without_running(run, "canceled", f"canceled by {run.canceled_by} before it started")
            elif run.id in self.dispatcher.running() and run.id not in self._signaled:
                self.dispatcher.cancel(run)
                self._signaled.add(run.id)

    # -- start and finish ----------------------------------------------------------------------

    def _start(self) -> None:
        capacity = self.settings.MAX_RUNS - len(self.dispatcher.running())
        if capacity <= 0:
            return
        for run in reversed(self.store.list_runs(states=("queued",), limit=500)):
            if capacity <= 0:
                break
            if not run.admitted or run.cancel_requested:
                continue
            if not self.store.update_run(run.id, only_if_state=("queued",), state="running", started_at=time.time()):
                continue
            pid = self.dispatcher.start(run)
            self.store.update_run(run.id, worker_pid=pid)
            run = self.store.get_run(run.id)
            self.reporter.running(run, [])
            self.reporter.status(run, "running", f"run #{run.id} running")
            capacity -= 1
            # Runs still queued learn their new place in the line.
        for run in self.store.list_runs(states=("queued",), limit=500):
            if run.admitted:
                self.reporter.queued(run)

    def _finish_exited(self) -> None:
        for exited in self.dispatcher.exited():
            run = self.store.get_run(exited.run_id)
            if run is None or run.state != "running":
                continue
            files = RunFiles(self.settings.runs_dir, run.id)
            report = files.read_report()
            if report is None:
                report = _empty_report(run, "error")
                report["notes"] = [f"the run process ended (exit {exited.returncode}) without a report"]
            self._finalize(run, report)
            self._progress_seen.pop(run.id, None)
            self._signaled.discard(run.id)

    def _end_without_running(self, run: Run, status: str, note: str) -> None:
        report = _empty_report(run, status)
        report["notes"] = [note]
        self.store.update_run(run.id, note=note)
        self._finalize(self.store.get_run(run.id), report)

    def _finalize(self, run: Run, report: dict[str, Any]) -> None:
        """Record the final state once, then say it on the forge: comment and commit status."""
        status = report["status"]
        assert status in FINAL_STATES
        if not self.store.update_run(
            run.id, only_if_state=ACTIVE_STATES, state=status, report=report, finished_at=time.time()
        ):
            return  # someone else finished it: exactly one final report
        run = self.store.get_run(run.id)
        head_sha = None
        if run.sha:
            try:
                head_sha = self.forge.get_pull(run.owner, run.repo, run.pr).head_sha
            except ForgeError as exc:
                log.warning("run %s: could not re-read the PR head: %s", run.id, exc)
        self.reporter.final(run, report, head_sha)
        log.info("run %s finished: %s", run.id, status)

    def _refresh_progress(self) -> None:
        for run_id in self.dispatcher.running():
            events = RunFiles(self.settings.runs_dir, run_id).read_events()
            if len(events) == self._progress_seen.get(run_id):
                continue
            self._progress_seen[run_id] = len(events)
            run = self.store.get_run(run_id)
            if run is not None and run.state == "running":
                self.reporter.running(run, events)


def _empty_report(run: Run, status: str) -> dict[str, Any]:
    return {
        "run": run.id,
        "recipe": run.recipe,
        "sha": run.sha or "",
        "status": status,
        "passed": status == "passed",
        "total_ms": 0,
        "steps": [],
        "notes": [],
    }
