"""The worker: admits accepted runs, dispatches them, and reports how they ended.

One pass of the loop, in order: handle ``!testme cancel`` requests; admit new runs
(organisation membership, pin the PR head, supersede older runs of the same PR); signal the
runs whose cancel was requested; start admitted runs while fewer than ``MAX_RUNS`` are going;
finalize the runs whose harness ended; refresh the status comments of running runs; deliver
the outbox. Then wait for the doorbell, or until the next outbox retry or dispatcher poll.

On start it recovers: a thorough janitor sweep, then every run still marked running is
adopted by the dispatcher (watched if its harness lives, collected if it is gone), and queued
runs simply resume. Every final state is recorded together with its report writes in one
transaction, and only from an active state: exactly one final report per run.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from . import logs
from .config import Settings
from .dispatch import Dispatcher, Finished
from .doorbell import Doorbell
from .errors import CcciError, ForgeError, TransientInfraError
from .intake.policy import authorize, refusal_text
from .outbox import Courier
from .reporter import Reporter
from .store import ACTIVE_STATES, FINAL_STATES, Run, Store

log = logging.getLogger(__name__)

IDLE_WAIT = 5.0  # how long to wait for the doorbell when nothing is due
INTERRUPTED = "interrupted: {reason}; its app, lock and sandbox were cleaned up. Comment `{trigger}` to run it again."


class Worker:
    """Drives runs from queued to their final report on this host."""

    def __init__(
        self, settings: Settings, forge: Any, *, store: Store | None = None, dispatcher: Dispatcher | None = None
    ):
        self.settings = settings
        self.forge = forge
        self.store = store or Store(settings.db_path)
        self.reporter = Reporter(self.store, settings)
        self.courier = Courier(self.store, forge)
        self.doorbell = Doorbell(settings.STATE_DIR / "worker.sock")
        self.dispatcher = dispatcher or make_dispatcher(settings, self.doorbell)
        self._progress_seen: dict[int, int] = {}
        self._signaled: set[int] = set()  # runs already asked to stop: cancel once, then wait

    def serve(self, stop: threading.Event) -> None:
        """Recover, then run passes until ``stop`` is set."""
        self.doorbell.listen()
        try:
            self.recover()
            while not stop.is_set():
                wait = self.run_pass()
                self.store.beat("worker")  # /healthz: the worker completes passes
                self.doorbell.wait(wait)
        finally:
            self.doorbell.close()

    def recover(self) -> None:
        """Pick up after a restart: sweep what dead runs left, adopt runs still marked running."""
        if self.settings.DISPATCH == "local":
            from .harness.run import make_janitor

            try:
                make_janitor(self.settings).thorough()
            except Exception:
                log.exception("recovery sweep failed")
        for run in self.store.list_runs(states=("running",), limit=10_000):
            logs.for_run(log, run.id).info("recovering (dispatch ref %s)", run.dispatch_ref)
            if run.dispatch_ref:
                self.dispatcher.adopt(run)
            else:  # crashed between marking it running and starting it: it never started
                self.store.update_run(run.id, only_if_state=("running",), state="queued", started_at=None)

    def run_pass(self) -> float:
        """Do one pass of work; return how long the worker may wait before the next."""
        self._handle_cancel_requests()
        self._admit()
        self._signal_cancels()
        self._start()
        self._finish()
        self._refresh_progress()
        next_due = self.courier.deliver_due()
        wait = IDLE_WAIT if not self.dispatcher.active() else getattr(self.dispatcher, "poll_interval", 1.0)
        if next_due is not None:
            wait = min(wait, max(0.0, next_due - time.time()))
        return wait

    # -- admission -----------------------------------------------------------------------------

    def _admit(self) -> None:
        for run in reversed(self.store.list_runs(states=("queued",), limit=500)):
            if run.admitted or run.cancel_requested:
                continue
            try:
                self._admit_one(run)
            except ForgeError as exc:
                # The forge is down: the run stays unadmitted and is tried again next pass.
                logs.for_run(log, run.id).warning("admitting: %s", exc)

    def _admit_one(self, run: Run) -> None:
        if not run.authorized:
            decision = authorize(
                run.requester,
                allowed_users=self.settings.ALLOWED_USERS,
                allowed_orgs=self.settings.ALLOWED_ORGS,
                is_org_member=self.forge.is_org_member,
            )
            if not decision.allowed:
                logs.for_run(log, run.id).info("refused: %s", decision.reason)
                with self.store.transaction():
                    self.store.update_run(
                        run.id, only_if_state=("queued",), state="refused", note=decision.reason,
                        finished_at=time.time(),
                    )  # fmt: skip
                    self.reporter.refuse(
                        owner=run.owner,
                        repo=run.repo,
                        pr=run.pr,
                        comment_id=run.comment_id or 0,
                        login=run.requester,
                        text=refusal_text(run.requester, self.settings.TRIGGER),
                    )
                return
            with self.store.transaction():
                self.store.update_run(run.id, authorized=1)
                self.reporter.react(run, "eyes")
        pull = self.forge.get_pull(run.owner, run.repo, run.pr)
        if pull.state != "open":
            self._end_without_running(run, "canceled", "the pull request was closed before the run started")
            return
        with self.store.transaction():
            self.store.update_run(run.id, sha=pull.head_sha, admitted=1)
            run = self.store.get_run(run.id)
            self._supersede_older(run)
            self.reporter.queued(run)
            self.reporter.status(run, "queued", f"run #{run.id} queued")

    def _supersede_older(self, run: Run) -> None:
        """Cancel the PR's older runs: at most one run per PR goes on, the newest."""
        for older in self.store.list_runs(states=ACTIVE_STATES, owner=run.owner, repo=run.repo, pr=run.pr):
            if older.id < run.id and not older.superseded_by:
                self.store.update_run(
                    older.id,
                    only_if_state=ACTIVE_STATES,
                    cancel_requested=1,
                    canceled_by=f"run #{run.id}, which superseded it",
                    superseded_by=run.id,
                )

    # -- cancel --------------------------------------------------------------------------------

    def _handle_cancel_requests(self) -> None:
        for req in self.store.pending_cancel_requests():
            active = self.store.list_runs(states=ACTIVE_STATES, owner=req["owner"], repo=req["repo"], pr=req["pr"])
            login = req["login"]
            may = any(r.requester.lower() == login.lower() for r in active)
            if active and not may:
                try:
                    may = authorize(
                        login,
                        allowed_users=self.settings.ALLOWED_USERS,
                        allowed_orgs=self.settings.ALLOWED_ORGS,
                        is_org_member=self.forge.is_org_member,
                    ).allowed
                except ForgeError:
                    continue  # the forge is down; decide next pass
            with self.store.transaction():
                if not active:
                    self.reporter.reply(
                        owner=req["owner"],
                        repo=req["repo"],
                        pr=req["pr"],
                        comment_id=req["comment_id"] or 0,
                        text="There is no queued or running ccci run on this pull request to cancel.",
                    )
                elif not may:
                    self.reporter.refuse(
                        owner=req["owner"],
                        repo=req["repo"],
                        pr=req["pr"],
                        comment_id=req["comment_id"] or 0,
                        login=login,
                        text=refusal_text(login, self.settings.TRIGGER),
                    )
                else:
                    for run in active:
                        self.store.update_run(
                            run.id, only_if_state=ACTIVE_STATES, cancel_requested=1, canceled_by=f"@{login}"
                        )
                    self.reporter.react_to(req["owner"], req["repo"], req["comment_id"], "+1")
                self.store.mark_cancel_request_handled(req["id"])

    def _signal_cancels(self) -> None:
        for run in self.store.list_runs(states=ACTIVE_STATES, limit=500):
            if not run.cancel_requested:
                continue
            if run.state == "queued":
                self._end_without_running(run, "canceled", "canceled before it started")
            elif run.id in self.dispatcher.active() and run.id not in self._signaled:
                self._signaled.add(run.id)
                self.dispatcher.cancel(run)

    # -- start and finish ----------------------------------------------------------------------

    def _start(self) -> None:
        active = self.dispatcher.active()
        capacity = self.settings.MAX_RUNS - len(active)
        started = False
        if capacity > 0:
            running_prs = {(r.owner, r.repo, r.pr) for r in self.store.list_runs(states=("running",), limit=1000)}
            for run in reversed(self.store.list_runs(states=("queued",), limit=500)):
                if capacity <= 0:
                    break
                if not run.admitted or run.cancel_requested or (run.owner, run.repo, run.pr) in running_prs:
                    continue  # a superseded run of this PR is still tearing down: one at a time
                now = time.time()
                if not self.store.update_run(run.id, only_if_state=("queued",), state="running", started_at=now):
                    continue
                try:
                    ref = self.dispatcher.start(run)
                except TransientInfraError as exc:  # e.g. Drone down: nothing new was started
                    logs.for_run(log, run.id).warning("could not start, will retry: %s", exc)
                    self.store.update_run(run.id, only_if_state=("running",), state="queued", started_at=None)
                    break  # don't hit a dispatcher that is down with the rest of the queue this pass
                except CcciError as exc:  # configuration, a refused parameter, a permanent failure
                    logs.for_run(log, run.id).error("cannot start: %s", exc)
                    self._end_without_running(run, "error", f"ccci could not start this run: {exc}")
                    continue
                except Exception:  # a bug: still exactly one final report
                    logs.for_run(log, run.id).exception("starting failed")
                    self._end_without_running(run, "error", "ccci failed to start this run (see the worker log)")
                    continue
                self.store.update_run(run.id, dispatch_ref=ref)
                run = self.store.get_run(run.id)
                with self.store.transaction():
                    self.reporter.running(run, [])
                    self.reporter.status(run, "running", f"run #{run.id} running")
                running_prs.add((run.owner, run.repo, run.pr))
                capacity -= 1
                started = True
        if started:  # the runs still queued have moved up the line
            for run in self.store.list_runs(states=("queued",), limit=500):
                if run.admitted and not run.cancel_requested:
                    self.reporter.queued(run)

    def _finish(self) -> None:
        for finished in self.dispatcher.poll():
            run = self.store.get_run(finished.run_id)
            if run is None or run.state != "running":
                continue
            self._finalize(run, self._report_of(run, finished))
            self._progress_seen.pop(run.id, None)
            self._signaled.discard(run.id)

    def _report_of(self, run: Run, finished: Finished) -> dict[str, Any]:
        report = finished.report
        interrupted = INTERRUPTED.format(reason=finished.reason, trigger=self.settings.TRIGGER)
        if report is None:
            report = _empty_report(run, "error")
            report["notes"] = [interrupted]
        elif report.get("status") == "canceled" and not run.cancel_requested:
            # Nobody asked: the harness was stopped by its parent's death (a worker restart).
            report.setdefault("notes", []).insert(0, interrupted)
        return report

    def _end_without_running(self, run: Run, status: str, note: str) -> None:
        report = _empty_report(run, status)
        report["notes"] = [note]
        self._finalize(run, report, note=note)

    def _finalize(self, run: Run, report: dict[str, Any], note: str | None = None) -> None:
        """Record the final state and say it on the forge, together and exactly once."""
        status = report["status"]
        assert status in FINAL_STATES
        head_sha = None
        if run.sha:
            try:
                head_sha = self.forge.get_pull(run.owner, run.repo, run.pr).head_sha
            except ForgeError as exc:
                logs.for_run(log, run.id).warning("could not re-read the PR head: %s", exc)
        with self.store.transaction():
            changes: dict[str, Any] = {"state": status, "report": report, "finished_at": time.time()}
            if note is not None:
                changes["note"] = note
            if not self.store.update_run(run.id, only_if_state=ACTIVE_STATES, **changes):
                return  # finished already: exactly one final report
            self.reporter.final(self.store.get_run(run.id), report, head_sha)
        logs.for_run(log, run.id).info("finished: %s", status)

    def _refresh_progress(self) -> None:
        for run_id in self.dispatcher.active():
            run = self.store.get_run(run_id)
            if run is None or run.state != "running":
                continue
            events = self.dispatcher.progress(run)
            if len(events) == self._progress_seen.get(run_id):
                continue
            self._progress_seen[run_id] = len(events)
            self.reporter.running(run, events)


def make_dispatcher(settings: Settings, doorbell: Doorbell) -> Dispatcher:
    """Return the dispatcher ``DISPATCH`` names."""
    if settings.DISPATCH == "drone":
        from .dispatch.drone import DroneDispatcher

        return DroneDispatcher(settings)
    from .dispatch.local import LocalDispatcher

    return LocalDispatcher(settings, doorbell)


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
