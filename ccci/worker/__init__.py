"""The worker: drives every accepted run of this host from queued to its one final report.

    recover ─▶ each pass:  commands ▸ admission ▸ cancels ▸ start ▸ endings ▸ progress ▸ outbox
                           (and now and then a sweep of what dead runs left) ─▶ wait for the doorbell

Its duties, a module each, each testable in-process (``tests/worker/``):

* ``admission.py`` — authorize, pin the PR head, supersede the PR's older runs, refuse, back off;
* ``cancels.py``   — decide comment commands (cancel, usage help) once permission is known, and
  carry out requested cancels from every source;
* ``endings.py``   — seal each run's end exactly once, deciding the verdict when the harness
  left no report (never started, gone, interrupted, killed past its deadline);
* this module      — the loop, starting runs while fewer than ``MAX_RUNS`` go, and the running
  runs' progress on their comments.

On start it recovers: a sweep of dead runs' leftovers, then every run still marked running is
adopted by the dispatcher (watched if its harness lives, collected if it is gone), a run that
never got a harness is queued again, and queued runs simply resume.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .. import logs
from ..config import Settings
from ..dispatch import Dispatcher
from ..doorbell import Doorbell
from ..errors import CcciError, TransientInfraError
from ..outbox import Courier
from ..reporter import Reporter
from ..store import Run, Store
from .admission import Admission
from .cancels import Cancels
from .endings import Endings

log = logging.getLogger(__name__)

IDLE_WAIT = 5.0  # how long to wait for the doorbell when nothing is due
SWEEP_EVERY = 600.0  # seconds between the worker's sweeps of what dead runs left


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
        self.endings = Endings(settings, self.store, self.reporter, forge)
        self.admission = Admission(settings, self.store, self.reporter, forge, self.endings)
        self.cancels = Cancels(settings, self.store, self.reporter, forge, self.dispatcher, self.endings)
        self._progress_seen: dict[int, int] = {}
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
                self.endings.requeue(run, "its worker stopped before it started")

    def run_pass(self) -> float:
        """Do one pass of work; return how long the worker may wait before the next."""
        self.cancels.handle_commands()
        self.admission.admit()
        self.cancels.carry_out()
        self._start()
        self._finish()
        self._refresh_progress()
        self._sweep_now_and_then()
        due = [self.courier.deliver_due(), self.admission.backoff.next_due(), self.cancels.backoff.next_due()]
        wait = IDLE_WAIT if not self.dispatcher.active() else self.dispatcher.poll_interval
        for at in due:
            if at is not None:
                wait = min(wait, max(0.0, at - time.time()))
        return wait

    # -- starting runs -------------------------------------------------------------------------

    def _start(self) -> None:
        capacity = self.settings.MAX_RUNS - len(self.dispatcher.active())
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
            self.endings.requeue(run, f"could not start: {exc}")
            return False  # don't hit a dispatcher that is down with the rest of the queue this pass
        except CcciError as exc:  # configuration, a refused parameter, a permanent failure
            logs.for_run(log, run.id).error("cannot start: %s", exc)
            self.endings.without_running(run, "error", f"ccci could not start this run: {exc}")
            return True
        except Exception:  # a bug: still exactly one final report
            logs.for_run(log, run.id).exception("starting failed")
            self.endings.without_running(run, "error", "ccci failed to start this run (see the worker log)")
            return True
        run = self._run(run.id)
        with self.store.transaction():
            self.reporter.running(run, [])
            self.reporter.status(run, "running", f"run #{run.id} running")
        return True

    # -- runs that ended, and runs going on ----------------------------------------------------

    def _finish(self) -> None:
        for finished in self.dispatcher.poll():
            self._progress_seen.pop(finished.run_id, None)
            self.cancels.forget(finished.run_id)
            run = self.store.get_run(finished.run_id)
            if run is not None and run.state == "running":
                self.endings.harness_ended(run, finished)

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

    def _run(self, run_id: int) -> Run:
        run = self.store.get_run(run_id)
        assert run is not None, f"run {run_id} vanished from the store"
        return run


def make_dispatcher(settings: Settings, doorbell: Doorbell) -> Dispatcher:
    """Return the dispatcher ``DISPATCH`` names."""
    if settings.DISPATCH == "drone":
        from ..dispatch.drone import DroneDispatcher

        return DroneDispatcher(settings)
    from ..dispatch.local import LocalDispatcher

    return LocalDispatcher(settings, doorbell)
