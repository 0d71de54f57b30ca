"""The worker: admits accepted runs, dispatches them, and reports how they ended.

One pass of the loop, in order: handle commands (``!testme cancel``, and usage help for a
malformed ``!testme …``) once their author's permission is known; admit new runs (organisation
membership, pin the PR head, supersede older runs of the same PR); signal the runs whose cancel
was requested; start admitted runs while fewer than ``MAX_RUNS`` are going; finalize the runs
whose harness ended; refresh the status comments of running runs; deliver the outbox; now and
then, sweep what dead runs left. Then wait for the doorbell, or until the next outbox retry or
dispatcher poll.

The forge's answers decide admission: a permanent one (404, 410, 422, a malformed value) ends
the run at once with an ``error`` report that says why; a transient one (unreachable, 5xx, 429)
is asked again with a growing pause, and a run that cannot be admitted for ``ADMIT_TIMEOUT``
ends too. No run stays queued without bound.

On start it recovers: a thorough janitor sweep, then every run still marked running is
adopted by the dispatcher (watched if its harness lives, collected if it is gone), a run that
never got a harness is queued again, and queued runs simply resume. Every final state is
recorded together with its report writes in one transaction, and only from an active state:
exactly one final report per run.
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
from .intake.grammar import usage
from .intake.policy import Decision, authorize, limit_text, refusal_text
from .outbox import Courier
from .reporter import Reporter
from .store import ACTIVE_STATES, FINAL_STATES, PendingCommand, Run, Store

log = logging.getLogger(__name__)

IDLE_WAIT = 5.0  # how long to wait for the doorbell when nothing is due
SWEEP_EVERY = 600.0  # seconds between the worker's sweeps of what dead runs left
ADMIT_BACKOFF = (5.0, 300.0)  # first and longest pause between admission attempts
NOTHING_TO_CANCEL = "There is no queued or running ccci run on this pull request to cancel."
INTERRUPTED = "interrupted: {reason}; {cleanup}. Comment `{trigger}` to run it again."


class Worker:
    """Drives runs from queued to their final report on this host."""

    def __init__(
        self, settings: Settings, forge: Any, *, store: Store | None = None, dispatcher: Dispatcher | None = None
    ):
        self.settings = settings
        self.forge = forge
        self.store = store or Store(settings.db_path)
        self.reporter = Reporter(self.store, settings)
        self.courier = Courier(self.store, forge, bot_login=settings.BOT_LOGIN)
        self.doorbell = Doorbell(settings.STATE_DIR / "worker.sock")
        self.dispatcher = dispatcher or make_dispatcher(settings, self.doorbell)
        self._progress_seen: dict[int, int] = {}
        self._signaled: set[int] = set()  # runs already asked to stop: cancel once, then wait
        self._retry_at: dict[tuple[str, int], tuple[float, float]] = {}  # (what, id) -> (when, pause)
        self._first_seen_at: dict[tuple[str, int], float] = {}  # (what, id) -> first failure
        self._next_sweep = time.monotonic() + SWEEP_EVERY
        self._sweeping: threading.Thread | None = None

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
        try:
            summary = self.dispatcher.sweep()
            if summary:
                log.info("recovery sweep: %s", summary)
        except Exception:
            log.exception("recovery sweep failed")
        for run in self.store.list_runs(states=("running",), limit=10_000):
            logs.for_run(log, run.id).info("recovering (dispatch ref %s)", run.dispatch_ref)
            if run.dispatch_ref:
                self.dispatcher.adopt(run)
            else:  # crashed before its harness was recorded: no harness ever passed its gate
                self._requeue(run, "its worker stopped before it started")

    def run_pass(self) -> float:
        """Do one pass of work; return how long the worker may wait before the next."""
        self._handle_commands()
        self._admit()
        self._signal_cancels()
        self._start()
        self._finish()
        self._refresh_progress()
        self._sweep_now_and_then()
        next_due = self.courier.deliver_due()
        wait = IDLE_WAIT if not self.dispatcher.active() else self.dispatcher.poll_interval
        if next_due is not None:
            wait = min(wait, max(0.0, next_due - time.time()))
        if self._retry_at:
            wait = min(wait, max(0.0, min(at for at, _ in self._retry_at.values()) - time.time()))
        return wait

    # -- admission -----------------------------------------------------------------------------

    def _admit(self) -> None:
        for run in reversed(self.store.list_runs(states=("queued",), limit=500)):
            if run.admitted or run.cancel_requested or not self._due(("admit", run.id)):
                continue
            try:
                self._admit_one(run)
            except ForgeError as exc:
                self._forge_failed(run, exc)
            else:
                self._retry_at.pop(("admit", run.id), None)

    def _admit_one(self, run: Run) -> None:
        if not run.authorized:
            decision = self._authorize(run.requester)
            if not decision.allowed:
                self._refuse(run, decision.reason, refusal_text(run.requester, self.settings.TRIGGER))
                return
            since = time.time() - 3600
            if self.store.count_recent_runs(run.requester, since, up_to=run.id) > self.settings.RUNS_PER_HOUR:
                limited = limit_text(run.requester, self.settings.RUNS_PER_HOUR, self.settings.TRIGGER)
                self._refuse(run, f"{run.requester} reached RUNS_PER_HOUR", limited)
                return
            with self.store.transaction():
                self.store.update_run(run.id, authorized=1)
                self.reporter.react(run, "eyes")
        pull = self.forge.get_pull(run.owner, run.repo, run.pr)
        if pull.state != "open":
            self._end_without_running(run, "canceled", "the pull request was closed before the run started")
            return
        with self.store.transaction():
            self.store.update_run(run.id, sha=pull.head_sha, admitted=1, private=int(pull.private))
            run = self._run(run.id)
            self._supersede_older(run)
            self.reporter.queued(run)
            self.reporter.status(run, "queued", f"run #{run.id} queued")

    def _authorize(self, login: str) -> Decision:
        """Decide whether ``login`` may use ccci; a check the forge could not answer raises, to ask again."""
        decision = authorize(
            login,
            allowed_users=self.settings.ALLOWED_USERS,
            allowed_orgs=self.settings.ALLOWED_ORGS,
            is_org_member=self.forge.is_org_member,
        )
        if decision.uncertain:
            raise ForgeError(decision.reason, transient=True)
        return decision

    def _refuse(self, run: Run, reason: str, text: str) -> None:
        logs.for_run(log, run.id).info("refused: %s", reason)
        with self.store.transaction():
            self.store.update_run(run.id, only_if_state=("queued",), state="refused", note=reason,
                                  finished_at=time.time())  # fmt: skip
            self.reporter.refuse(owner=run.owner, repo=run.repo, pr=run.pr, comment_id=run.comment_id or 0,
                                 login=run.requester, text=text)  # fmt: skip

    def _forge_failed(self, run: Run, exc: ForgeError) -> None:
        """End the run on a permanent answer; back off on a transient one, within ADMIT_TIMEOUT."""
        if not exc.transient:
            logs.for_run(log, run.id).warning("the forge refused admission: %s", exc)
            # A PR the forge does not know has nowhere to be told: the report stays with ccci
            # (run page, admin API), and nothing is sent that could only fail for ever.
            gone = exc.status in (404, 410)
            self._end_without_running(run, "error", _admission_refused(run, exc), tell_forge=not gone)
            if gone and self.store.drop_pending(run.id, f"pull request #{run.pr} is gone"):
                logs.for_run(log, run.id).info("dropped its writes to the forge: the pull request is gone")
            return
        waited = time.time() - run.created_at
        if waited > self.settings.ADMIT_TIMEOUT:
            note = (
                f"ccci could not admit this run for {waited / 60:.0f} minutes because the forge did not "
                f"answer ({exc}). Comment `{self.settings.TRIGGER}` again once the forge is back."
            )
            self._end_without_running(run, "error", note)
            return
        pause = self._backoff(("admit", run.id))
        logs.for_run(log, run.id).warning("admitting: %s (trying again in %.0f s)", exc, pause)

    def _supersede_older(self, run: Run) -> None:
        """Cancel the PR's older runs: at most one run per PR goes on, the newest."""
        for older in self.store.list_runs(states=ACTIVE_STATES, owner=run.owner, repo=run.repo, pr=run.pr):
            by = f"run #{run.id}, which superseded it"
            if older.id < run.id and not older.superseded_by and self.store.request_cancel(older.id, by):
                self.store.update_run(older.id, superseded_by=run.id)

    # -- commands: cancel, and usage help ---------------------------------------------------------

    def _handle_commands(self) -> None:
        for command in self.store.pending_commands():
            if not self._due(("command", command.id)):
                continue
            try:
                if command.command == "usage":
                    self._usage(command)
                else:
                    self._cancel(command)
            except ForgeError as exc:
                if time.time() - self._first_seen(("command", command.id)) > self.settings.ADMIT_TIMEOUT:
                    log.warning("command %s dropped: the forge did not answer for too long (%s)", command.id, exc)
                else:
                    self._backoff(("command", command.id))
                    continue
            self._retry_at.pop(("command", command.id), None)
            self._first_seen_at.pop(("command", command.id), None)
            self.store.mark_command_handled(command.id)

    def _usage(self, command: PendingCommand) -> None:
        """Help a member who mistyped a command; a stranger gets no answer at all."""
        if self._authorize(command.login).allowed:
            self.reporter.reply(owner=command.owner, repo=command.repo, pr=command.pr,
                                comment_id=command.comment_id or 0, login=command.login,
                                text=usage(self.settings.TRIGGER))  # fmt: skip

    def _cancel(self, command: PendingCommand) -> None:
        c = command
        active = self.store.list_runs(states=ACTIVE_STATES, owner=c.owner, repo=c.repo, pr=c.pr)
        may = any(r.requester.lower() == c.login.lower() for r in active) or self._authorize(c.login).allowed
        with self.store.transaction():
            if not may:
                self.reporter.refuse(owner=c.owner, repo=c.repo, pr=c.pr, comment_id=c.comment_id or 0,
                                     login=c.login, text=refusal_text(c.login, self.settings.TRIGGER))  # fmt: skip
            elif not active:
                self.reporter.reply(owner=c.owner, repo=c.repo, pr=c.pr, comment_id=c.comment_id or 0,
                                    login=c.login, once=False, text=NOTHING_TO_CANCEL)  # fmt: skip
            else:
                for run in active:
                    self.store.request_cancel(run.id, f"@{c.login}")
                if c.comment_id:
                    self.reporter.react_to(c.owner, c.repo, c.comment_id, "+1")

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
                if not self._start_one(run):
                    break
                running_prs.add((run.owner, run.repo, run.pr))
                capacity -= 1
                started = True
        if started:  # the runs still queued have moved up the line
            for run in self.store.list_runs(states=("queued",), limit=500):
                if run.admitted and not run.cancel_requested:
                    self.reporter.queued(run)

    def _start_one(self, run: Run) -> bool:
        """Start one run; return False when the dispatcher is down and the queue should wait."""
        if not self.store.update_run(run.id, only_if_state=("queued",), state="running", started_at=time.time()):
            return True
        run = self._run(run.id)
        try:
            # The reference is recorded before the harness may run a step (dispatch/local.py).
            self.dispatcher.start(run, lambda ref: self.store.update_run(run.id, dispatch_ref=ref))
        except TransientInfraError as exc:  # e.g. Drone down: nothing new was started
            logs.for_run(log, run.id).warning("could not start, will retry: %s", exc)
            self._requeue(run, f"could not start: {exc}")
            return False  # don't hit a dispatcher that is down with the rest of the queue this pass
        except CcciError as exc:  # configuration, a refused parameter, a permanent failure
            logs.for_run(log, run.id).error("cannot start: %s", exc)
            self._end_without_running(run, "error", f"ccci could not start this run: {exc}")
            return True
        except Exception:  # a bug: still exactly one final report
            logs.for_run(log, run.id).exception("starting failed")
            self._end_without_running(run, "error", "ccci failed to start this run (see the worker log)")
            return True
        run = self._run(run.id)
        with self.store.transaction():
            self.reporter.running(run, [])
            self.reporter.status(run, "running", f"run #{run.id} running")
        return True

    def _requeue(self, run: Run, why: str) -> None:
        logs.for_run(log, run.id).info("queued again: %s", why)
        self.store.update_run(run.id, only_if_state=("running",), state="queued", started_at=None, dispatch_ref=None)

    def _finish(self) -> None:
        for finished in self.dispatcher.poll():
            run = self.store.get_run(finished.run_id)
            self._progress_seen.pop(finished.run_id, None)
            self._signaled.discard(finished.run_id)
            if run is None or run.state != "running":
                continue
            if finished.requeue and not run.cancel_requested:
                # Its harness stopped before the pipeline began (the worker restarted): nothing ran.
                self._requeue(run, finished.reason)
                continue
            self._finalize(run, self._report_of(run, finished))

    def _report_of(self, run: Run, finished: Finished) -> dict[str, Any]:
        report = finished.report
        cleanup = finished.cleanup or "its app, lock and sandbox were cleaned up"
        interrupted = INTERRUPTED.format(reason=finished.reason, cleanup=cleanup, trigger=self.settings.TRIGGER)
        if report is None and finished.timed_out:
            report = _empty_report(run, "timed_out")
            report["notes"] = [f"timed out: {finished.reason}; {cleanup}."]
        elif report is None and run.cancel_requested:
            report = _empty_report(run, "canceled")
            report["notes"] = [f"canceled: {finished.reason}; {cleanup}."]
        elif report is None:
            report = _empty_report(run, "error")
            report["notes"] = [interrupted]
        elif report.get("status") == "canceled" and not run.cancel_requested:
            # Nobody asked: the harness was stopped by its parent's death (a worker restart),
            # and tore down itself before it wrote this report.
            note = INTERRUPTED.format(reason=finished.reason, cleanup="its own teardown ran",
                                      trigger=self.settings.TRIGGER)  # fmt: skip
            report.setdefault("notes", []).insert(0, note)
        return report

    def _end_without_running(self, run: Run, status: str, note: str, *, tell_forge: bool = True) -> None:
        report = _empty_report(run, status)
        report["notes"] = [note]
        self._finalize(run, report, note=note, tell_forge=tell_forge)

    def _finalize(self, run: Run, report: dict[str, Any], note: str | None = None, *, tell_forge: bool = True) -> None:
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
            if tell_forge:
                self.reporter.final(self._run(run.id), report, head_sha)
        self._retry_at.pop(("admit", run.id), None)
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

    def _sweep_now_and_then(self) -> None:
        """Sweep dead runs' leftovers every SWEEP_EVERY seconds, in a thread (reaping runs teardowns)."""
        if time.monotonic() < self._next_sweep or (self._sweeping is not None and self._sweeping.is_alive()):
            return
        self._next_sweep = time.monotonic() + SWEEP_EVERY

        def sweep() -> None:
            try:
                summary = self.dispatcher.sweep()
                if summary:
                    log.info("sweep: %s", summary)
            except Exception:
                log.exception("sweep failed")

        self._sweeping = threading.Thread(target=sweep, name="ccci-sweep", daemon=True)
        self._sweeping.start()

    # -- small helpers -------------------------------------------------------------------------

    def _run(self, run_id: int) -> Run:
        run = self.store.get_run(run_id)
        assert run is not None, f"run {run_id} vanished from the store"
        return run

    def _due(self, key: tuple[str, int]) -> bool:
        retry = self._retry_at.get(key)
        return retry is None or retry[0] <= time.time()

    def _backoff(self, key: tuple[str, int]) -> float:
        """Push ``key``'s next attempt back, doubling the pause each time; return the pause."""
        _, pause = self._retry_at.get(key, (0.0, ADMIT_BACKOFF[0] / 2))
        pause = min(pause * 2, ADMIT_BACKOFF[1])
        self._retry_at[key] = (time.time() + pause, pause)
        self._first_seen_at.setdefault(key, time.time())
        return pause

    def _first_seen(self, key: tuple[str, int]) -> float:
        return self._first_seen_at.setdefault(key, time.time())


def _admission_refused(run: Run, exc: ForgeError) -> str:
    """Say, for the PR, why the forge's permanent answer ended the run."""
    where = f"pull request #{run.pr} of {run.full_name}"
    if exc.status == 404:
        return f"{where} was not found on the forge (404): it was deleted, or ccci's account cannot see it."
    if exc.status == 410:
        return f"{where} is gone from the forge (410)."
    if exc.status in (401, 403):
        return f"the forge refused ccci's token ({exc.status}) while reading {where}: check FORGE_TOKEN's scopes."
    return f"the forge's answer about {where} cannot be used: {exc}"


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
