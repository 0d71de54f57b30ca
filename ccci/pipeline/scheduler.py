"""The dataflow scheduler: run a Pipeline's steps on an Executor's machines and report.

    boot ONE machine ─▶ work steps, as a DAG ─────────────────────▶ teardown steps ─▶ close all
                        a step starts when its needs passed          always, after everything
                        and a parallelism permit is free             else ended, own timeouts

Threads: the caller's (main) thread decides everything; one worker thread per running step calls
``Machine.exec`` and writes the step's outcome into its record, then wakes the main thread
through a queue. Every wait in the main thread is a ``queue.get`` with a short timeout, after
which it looks at the run's ``Stop`` (``pipeline/stop.py``): a cancel or the deadline is a request
there, set by the harness' signal handlers or a timer, never an exception thrown into this loop.

Outcomes: a step that failed, timed out, errored or was skipped skips its dependents,
transitively. A stop request (canceled, or timed out: the one deadline is the stop's, the
harness' guard or, standalone, the pipeline's ``timeout``) stops in-flight steps (they end
``canceled``) and marks the not-started ones ``canceled``; teardown steps run anyway, and the
stop shields them (``shield``): a request during teardown is recorded, and nothing acts on it.
An ``InfraError`` makes a step ``error``; a machine that cannot boot makes every step ``error``.
The verdict is ``report.verdict``.

Machines: steps run in the booted machine, concurrently when the graph allows, except that a
step others ``fork_from`` runs alone in its machine, so the checkpoint taken right after it
holds exactly its state. A ``fork_from: X`` step runs in a fresh fork of X's checkpoint; with an
executor whose forks are not isolated it runs alone in the parent machine instead, and the
report says so. Environment of a step: ci.yml env < the run's ``env`` (the harness' RECIPE,
APP_DOMAIN, ABRA_DIR, CCCI_RUN, CCCI_SHA win) < ``CCCI_STEP``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InfraError, TransientInfraError
from .events import Event
from .executor import Checkpoint, ExecRequest, Executor, Machine
from .output import StreamBuffer
from .redact import Redactor
from .report import Report, StepResult, verdict
from .spec import Pipeline, Step
from .stop import Stop

log = logging.getLogger(__name__)
TICK = 0.1  # seconds between looks at the run's stop switch
FORK_RETRIES = 2


@dataclass
class _Record:
    """The scheduler's running state of one step; becomes a StepResult when the run ends."""

    step: Step
    state: str = "waiting"  # waiting | running | done
    status: str | None = None
    exit_code: int | None = None
    started_at: float | None = None
    duration_ms: int = 0
    infra_retries: int = 0
    note: str = ""  # ccci's own explanation, appended to stderr (infra errors)
    cancel: threading.Event = field(default_factory=threading.Event)
    machine: Machine | None = None
    checkpoint: Checkpoint | None = None
    stdout: StreamBuffer | None = None
    stderr: StreamBuffer | None = None


def run_pipeline(
    pipeline: Pipeline,
    executor: Executor,
    workspace: Path,
    env: dict[str, str],
    *,
    stop: Stop | None = None,
    on_event: Callable[[Event], None] | None = None,
    secrets: Iterable[str] = (),
    max_output: int = 1 << 20,
    host_env: dict[str, str] | None = None,
    run: str | int | None = None,
    recipe: str | None = None,
    sha: str | None = None,
) -> Report:
    """Run ``pipeline`` on ``executor`` in ``workspace`` and return its report; never raises for a step.

    ``stop`` is the run's stop switch; without one, the pipeline's own ``timeout`` is its deadline.
    """
    step_envs, spec_secrets = pipeline.resolve_env(host_env)  # SpecError here: nothing ran
    redact = Redactor([*secrets, *spec_secrets])
    own = stop is None
    stop = Stop(deadline=pipeline.timeout) if stop is None else stop
    scheduler = _Scheduler(pipeline, executor, workspace, env, step_envs, redact, max_output, stop)
    scheduler.on_event = on_event
    started_at, t0 = time.time(), time.monotonic()
    try:
        scheduler.execute()
    finally:
        if own:
            stop.cancel_deadline()
    results = [scheduler.result(r) for r in scheduler.records.values()]
    return Report(
        run=run if run is not None else env.get("CCCI_RUN"),
        recipe=recipe if recipe is not None else env.get("RECIPE", pipeline.path.parent.name),
        sha=sha if sha is not None else env.get("CCCI_SHA", ""),
        status=verdict(results, scheduler.stopped),
        total_ms=int((time.monotonic() - t0) * 1000),
        steps=results,
        notes=[scheduler.redact(n) for n in scheduler.notes],
        started_at=started_at,
    )


class _Scheduler:
    """One run's state: records, machines, the wakeup queue and the stop reason."""

    def __init__(
        self,
        pipeline: Pipeline,
        executor: Executor,
        workspace: Path,
        env: dict[str, str],
        step_envs: dict[str, dict[str, str]],
        redact: Redactor,
        max_output: int,
        stop: Stop,
    ):
        self.pipeline, self.executor, self.workspace, self.env = pipeline, executor, workspace, env
        self.step_envs, self.redact, self.max_output = step_envs, redact, max_output
        self.stop = stop
        self.on_event: Callable[[Event], None] | None = None
        self.forks: list[Machine] = []  # fork machines kept open because others fork from them
        self.records = {s.name: _Record(s) for s in pipeline.steps}
        self.sources = {s.fork_from for s in pipeline.steps if s.fork_from}
        self.queue: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.root: Machine | None = None
        self.exclusive = False  # a step runs alone in the root machine
        self.busy = 0  # steps running in the root machine
        self.running = 0
        self.stopped: str | None = None
        self.teardown_phase = False
        self.notes: list[str] = []

    def execute(self) -> None:
        """Boot, run the work steps, then the teardown steps; close everything on every path."""
        for rec in self.records.values():
            self._emit(Event("queued", rec.step.name, time.time()))
        try:
            self._boot()
            work = [r for r in self.records.values() if not r.step.teardown]
            self._drive(work)
            shield = getattr(self.stop, "shield", None)
            if shield is not None:
                shield()  # the harness' guard: signals from now on cannot cut teardown short
            self.teardown_phase = True
            if self.root is not None:
                self._drive([r for r in self.records.values() if r.step.teardown])
        finally:
            self._shutdown()
        self._pump(0)

    def _boot(self) -> None:
        box: dict = {}

        def boot() -> None:
            try:
                box["machine"] = self.executor.boot(self.workspace, self.pipeline.image)
            except Exception as exc:  # an executor bug is reported like an infra failure
                box["error"] = exc
            self.queue.put(None)

        thread = threading.Thread(target=boot, name="ccci-boot", daemon=True)
        thread.start()
        self.threads.append(thread)
        while thread.is_alive():
            self._wait(stoppable=True)
        self.root = box.get("machine")
        if self.root is None:
            reason = f"ccci: could not provide a machine: {box.get('error')}"
            for rec in self.records.values():
                self._finish_unstarted(rec, "error", reason)

    def _drive(self, recs: list[_Record]) -> None:
        while any(r.state != "done" for r in recs):
            with self.lock:
                self._start_ready(recs)
            self._wait(stoppable=not self.teardown_phase)

    def _wait(self, stoppable: bool) -> None:
        """Pump events for one tick; then stop the run if its stop switch was set."""
        self._pump(TICK)
        first = self.stop.first
        if stoppable and first is not None:
            self._stop(first.status)

    def _stop(self, status: str) -> None:
        if self.stopped is None:
            self.stopped = status
            self.notes.append(f"run {status.replace('_', ' ')}: in-flight steps stopped, teardown ran")
        if self.teardown_phase:
            return  # teardown always finishes; its steps have their own timeouts
        with self.lock:
            for rec in self.records.values():
                if rec.state == "running":
                    rec.cancel.set()
                elif rec.state == "waiting" and not rec.step.teardown:
                    self._finish_unstarted(rec, "canceled")

    def _start_ready(self, recs: list[_Record]) -> None:
        changed = True
        while changed:  # skipping one step can decide another: repeat until nothing moves
            changed = False
            for rec in recs:
                if rec.state != "waiting":
                    continue
                needs = [self.records[n] for n in rec.step.needs]
                if any(n.state != "done" for n in needs):
                    continue
                if not self.teardown_phase and any(n.status != "passed" for n in needs):
                    self._finish_unstarted(rec, "skipped")
                    changed = True
                elif self.running < self.pipeline.parallelism and self._place(rec):
                    self._launch(rec)
                    changed = True

    def _place(self, rec: _Record) -> bool:
        """Decide whether ``rec`` can start now, and on which machine (None: a fork, made later)."""
        step = rec.step
        if step.fork_from and self.executor.isolated_forks:
            rec.machine = None
            return True
        alone = step.name in self.sources or bool(step.fork_from)
        if self.exclusive or (alone and self.busy):
            return False
        if step.fork_from:
            self.notes.append(
                f"executor {self.executor.name} has no isolated forks: step {step.name} ran in the "
                f"parent's sandbox, alone, instead of in a fork of {step.fork_from}"
            )
        rec.machine, self.exclusive = self.root, alone
        self.busy += 1
        return True

    def _launch(self, rec: _Record) -> None:
        rec.state, rec.started_at, self.running = "running", time.time(), self.running + 1
        limit = max(self.max_output // 2, 2)  # the step's output budget, shared by its two streams
        line = self._line_sink(rec.step.name)
        rec.stdout = StreamBuffer(limit, metrics=True, on_line=line and (lambda t: line("stdout", t)))
        rec.stderr = StreamBuffer(limit, on_line=line and (lambda t: line("stderr", t)))
        thread = threading.Thread(target=self._work, args=(rec,), name=f"ccci-step-{rec.step.name}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def _line_sink(self, name: str):
        if self.on_event is None:
            return None

        def sink(stream: str, text: str) -> None:
            self.queue.put(Event("output", name, time.time(), stream=stream, text=self.redact(text)))

        return sink

    def _work(self, rec: _Record) -> None:
        step, owned, t0 = rec.step, None, time.monotonic()
        stdout, stderr, started_at = rec.stdout, rec.stderr, rec.started_at
        assert stdout is not None and stderr is not None and started_at is not None  # set by _start
        self.queue.put(Event("started", step.name, started_at))
        status, code = "error", None
        try:
            machine = rec.machine
            if machine is None:
                assert step.fork_from is not None  # _place leaves only forks without a machine
                machine = owned = self._fork(rec, step.fork_from)
            env = {**self.step_envs[step.name], **self.env, "CCCI_STEP": step.name}
            sinks = {"stdout": stdout, "stderr": stderr}
            request = ExecRequest(step.run, env, step.timeout, lambda s, chunk: sinks[s].write(chunk), rec.cancel)
            result = machine.exec(request)
            rec.infra_retries += result.infra_retries
            code = result.exit_code
            if result.timed_out:
                status = "timed_out"
            elif result.canceled or (rec.cancel.is_set() and code != 0):
                status = "canceled"
            else:
                status = "passed" if code == 0 else "failed"
            if status == "passed" and step.name in self.sources and self.executor.isolated_forks:
                rec.checkpoint = machine.checkpoint()
        except InfraError as exc:
            status, rec.note = "error", f"ccci: infrastructure error: {exc}"
        except Exception as exc:
            log.exception("step %s: executor failed", step.name)
            status, rec.note = "error", f"ccci: executor failed: {type(exc).__name__}: {exc}"
        finally:
            if owned is not None and step.name in self.sources:
                with self.lock:
                    self.forks.append(owned)  # its checkpoint may need it alive; closed at the end
            elif owned is not None:
                owned.close()
            with self.lock:
                rec.status, rec.exit_code, rec.state = status, code, "done"
                rec.duration_ms = int((time.monotonic() - t0) * 1000)
                self.running -= 1
                if rec.machine is not None and rec.machine is self.root:
                    self.busy -= 1
                    self.exclusive = False if step.name in self.sources or step.fork_from else self.exclusive
            self.queue.put(Event("finished", step.name, time.time(), status, rec.duration_ms, code))

    def _fork(self, rec: _Record, fork_from: str) -> Machine:
        source = self.records[fork_from]
        if source.checkpoint is None:
            raise InfraError(f"no checkpoint of {source.step.name} to fork from")
        for attempt in range(FORK_RETRIES + 1):
            try:
                return source.checkpoint.fork()
            except TransientInfraError:
                if attempt == FORK_RETRIES:
                    raise
                rec.infra_retries += 1
        raise AssertionError("unreachable")

    def _finish_unstarted(self, rec: _Record, status: str, note: str = "") -> None:
        rec.state, rec.status, rec.note = "done", status, note
        self.queue.put(Event("finished", rec.step.name, time.time(), status, 0, None))

    def _pump(self, timeout: float) -> None:
        """Deliver queued events to on_event, waiting up to ``timeout`` for the first one."""
        try:
            item = self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
            while True:
                if item is not None and self.on_event is not None:
                    try:
                        self.on_event(item)
                    except Exception:  # a broken progress display must not break the run
                        log.exception("on_event failed")
                item = self.queue.get_nowait()
        except queue.Empty:
            pass

    def _emit(self, event: Event) -> None:
        self.queue.put(event)

    def _shutdown(self) -> None:
        """Stop whatever still runs, then close every machine and checkpoint, on every path."""
        for rec in self.records.values():
            rec.cancel.set()
        if any(t.is_alive() for t in self.threads) and self.root is not None:
            self.root.close()  # only on an abnormal exit: kill what ignores the cancel
        for thread in self.threads:
            thread.join()
        for rec in self.records.values():
            if rec.checkpoint is not None:
                rec.checkpoint.close()
        for machine in self.forks:
            machine.close()
        if self.root is not None:
            self.root.close()

    def result(self, rec: _Record) -> StepResult:
        """Return the finished record as a StepResult, output redacted and bounded."""
        stdout = rec.stdout.finish(self.redact) if rec.stdout else ""
        stderr = rec.stderr.finish(self.redact) if rec.stderr else ""
        if rec.note:
            stderr += ("\n" if stderr and not stderr.endswith("\n") else "") + self.redact(rec.note) + "\n"
        return StepResult(
            name=rec.step.name,
            status=rec.status or "canceled",
            exit_code=rec.exit_code,
            duration_ms=rec.duration_ms,
            allow_failure=rec.step.allow_failure,
            metrics=dict(rec.stdout.metrics) if rec.stdout else {},
            stdout=stdout,
            stderr=stderr,
            infra_retries=rec.infra_retries,
            teardown=rec.step.teardown,
            started_at=rec.started_at,
        )
