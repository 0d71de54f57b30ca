"""One run, end to end — the same code under the local worker, under Drone and for ``ccci test``.

    lifetime guard ▸ [the start gate] ▸ the run's directory and log
      ▸ the run's ABRA_DIR ▸ checkout of the pinned sha ▸ [app lock] ▸ executor ▸ pipeline
      ◂ lock released ◂ ABRA_DIR removed                 (one ExitStack, in reverse, on every path)
    ▸ verdict_of ▸ report.json ▸ guard uninstalled

Two modes, chosen with the executor and told to the steps as ``CCCI_MODE``: ``fork`` — QEMU forks
of the docker image, each with a swarm of its own, so the app is the fork's and needs no lock
(abra's whole world is then in the guest: the ABRA_DIR path holds only the checkout, and the
pipeline adds the fork's local swarm as abra's server); ``host`` — the process sandbox, steps
drive the operator's swarm through the run's ABRA_DIR (``servers/`` and ``catalogue/`` linked
from ABRA_HOME), and the app's lock keeps two runs of one recipe apart. The report says which.

Resources nest: each is entered in that order and left in reverse order whatever happens — a
failed checkout, a busy app, a cancel (SIGTERM, exit 143), the deadline (exit 142), the
starter's death. Signals only set the guard's stop switch; every phase that waits watches it
(``pipeline/stop.py``), and the pipeline's teardown steps are shielded from it.

The run's final status is decided in one place, ``verdict_of``: the pipeline's own report when
it ran (with a stop that came during teardown noted), else the stop, the failure that kept the
pipeline from running, or a bug. A run reaps only its own app (a dead holder of its lock, in
``acquire_app_lock``); what other dead runs left is the worker's periodic sweep, or ``ccci sweep``.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TextIO

from .. import logs
from ..config import Settings
from ..errors import InfraError, PermanentInfraError, SpecError
from ..names import is_recipe
from ..pipeline.events import Event
from ..pipeline.redact import Redactor
from ..pipeline.report import Report
from ..pipeline.scheduler import run_pipeline
from ..pipeline.spec import Pipeline, load_pipeline
from ..pipeline.stop import Stopped, StopRequest
from ..vm.bwrap import BwrapExecutor, Confinement
from ..vm.choose import choose_executor
from .abradir import RunAbraDir, reaper_prefix
from .applock import AppBusy, LockHolder, acquire_app_lock
from .artifacts import collect as collect_artifacts
from .checkout import checkout_pull, copy_source, head_commit
from .janitor import Janitor
from .lifetime import LifetimeGuard, install_guard
from .request import RunRequest
from .runfiles import RunFiles
from .wire import event_line, report_line

log = logging.getLogger(__name__)

EXIT_NOT_STARTED = 75  # EX_TEMPFAIL: nothing ran and no report was written; start the run again
GATE_POLL = 0.1  # seconds between looks at the stop switch while waiting at the gate


def ci_file_for(settings: Settings, request: RunRequest) -> Path:
    """Return the ci.yml of the request's recipe, falling back to ``_default``."""
    if request.ci_file is not None:
        return request.ci_file
    return ci_file_of(settings, request.recipe)


def ci_file_of(settings: Settings, recipe: str) -> Path:
    """Return the ci.yml of ``recipe`` under RECIPES_DIR, falling back to ``_default``."""
    own = settings.RECIPES_DIR / recipe / "ci.yml"
    return own if own.is_file() else settings.RECIPES_DIR / "_default" / "ci.yml"


def needs_forge_token(settings: Settings, recipe: str, *, private: bool) -> bool:
    """Tell whether a run of ``recipe`` needs the forge token: a private checkout, or a step naming it.

    A step gets the token only through ``from_env: CCCI_FORGE_TOKEN`` in the recipe's ci.yml
    (written by the operator, never by the PR); otherwise the harness is not given it at all.
    """
    if not settings.FORGE_TOKEN:
        return False
    if private:
        return True
    try:
        pipeline = load_pipeline(ci_file_of(settings, recipe))
    except SpecError:
        return False  # the harness reports the broken ci.yml; it needs no token for that
    variables = [*pipeline.env, *(var for step in pipeline.steps for var in step.env)]
    return any(var.from_env == "CCCI_FORGE_TOKEN" for var in variables)


def app_domain(settings: Settings, recipe: str) -> str:
    """Return the domain the recipe's test app is deployed at; the app lock is keyed by it."""
    return f"{recipe}.{settings.DOMAIN}"


class RunOutput:
    """Where one run speaks: its log file, its events file, ``echo`` (Drone's step log), ``on_event``."""

    def __init__(self, files: RunFiles, echo: TextIO | None, on_event: Callable[[Event], None] | None, redact):
        self.files, self.echo, self.on_event = files, echo, on_event
        self.redact: Redactor = redact
        self._log = files.log.open("a", encoding="utf-8")

    def write(self, line: str) -> None:
        """Append a line to the run's log (and echo it)."""
        self._log.write(line)
        self._log.flush()
        if self.echo:
            self.echo.write(line)
            self.echo.flush()

    def say(self, text: str) -> None:
        """Log a line of ccci's own about the run, redacted."""
        self.write(f"[ccci] {self.redact(text)}\n")

    def emit(self, event: Event) -> None:
        """Record a progress event (output lines go to the log)."""
        if event.kind == "output":
            self.write(f"[{event.step}] {event.text}\n")
            return
        data = event.to_dict()
        self.files.append_event(data)
        if self.echo:
            self.echo.write(event_line(data))
            self.echo.flush()
        if self.on_event:
            self.on_event(event)

    def close(self) -> None:
        """Close the log file."""
        self._log.close()


def execute(
    settings: Settings,
    request: RunRequest,
    *,
    on_event: Callable[[Event], None] | None = None,
    echo: TextIO | None = None,
) -> tuple[Report | None, int]:
    """Execute one run; return its report (as written to report.json) and the exit code.

    With ``echo`` (``ccci run``), the log, the progress events and the report are also printed
    there as they come — events and the report as the lines of ``harness/wire.py`` — which is how
    a Drone build's log carries them back to the worker.

    With ``request.gate`` the harness waits for ``start`` on stdin before it touches the run's
    directory: the local dispatcher records the dispatch first, so a run whose worker died in
    between is never executed by a harness nobody knows of. If the starter dies before the
    pipeline began, nothing has run: the harness tears down what it made, writes no report and
    exits ``EXIT_NOT_STARTED``, and the next worker starts the run again. The report is None
    only then.
    """
    logs.bind_run(request.run_id)  # this process is this run: every line it logs is about it
    with install_guard(settings.RUN_TIMEOUT, parent_pid=request.parent_pid) as guard:  # first: teardown is certain
        if request.gate and not _through_gate(guard):
            return None, EXIT_NOT_STARTED
        files = RunFiles(settings.runs_dir, request.run_id)
        files.create()
        out = RunOutput(files, echo, on_event, Redactor(settings.secrets()))
        started, t0 = time.time(), time.monotonic()
        report: Report | None = None
        failure: Exception | None = None
        try:
            report = _pipeline(settings, request, guard, files, out)
        except Exception as exc:  # decided by verdict_of, below
            failure = exc
        guard.shield()  # teardown is over, or never began: nothing may cut the report short
        final = verdict_of(request, guard.first, report, failure, out.redact)
        final.total_ms = int((time.monotonic() - t0) * 1000)
        final.started_at = final.started_at or started
        orphaned = request.gate and request.parent_pid is not None and os.getppid() != request.parent_pid
        if orphaned and not files.has_begun():
            # The worker died before this run's pipeline began: nothing ran, and the next worker
            # starts the run again. A report now would end it as interrupted instead.
            out.say("the worker went away before the run began; it will be started again")
            out.close()
            return None, EXIT_NOT_STARTED
        data = json.loads(out.redact(final.to_json()))
        files.write_report(data)
        if echo:
            echo.write(report_line(data))
            echo.flush()
        out.close()
        return Report.from_dict(data), guard.exit_code(0 if final.passed else 1)


def _pipeline(settings: Settings, request: RunRequest, guard: LifetimeGuard, files: RunFiles, out: RunOutput) -> Report:
    """Enter the run's resources in order, run its pipeline, and leave them in reverse on every path."""
    _ensure_writable(settings.LOCK_DIR, "LOCK_DIR")
    pipeline = load_pipeline(ci_file_for(settings, request))
    _, spec_secrets = pipeline.resolve_env()
    out.redact = Redactor([*settings.secrets(), *spec_secrets])
    guard.set_deadline(min(pipeline.timeout, settings.RUN_TIMEOUT))
    domain = app_domain(settings, request.recipe)
    with ExitStack() as resources:
        guard.check()
        box = resources.enter_context(
            RunAbraDir(files.dir, settings.ABRA_HOME, request.recipe, keep=settings.KEEP_ABRA_DIR)
        )
        if request.source is not None:
            out.say(f"copying {request.source}")
            copy_source(request.source, box.recipe_dir)
        else:
            out.say(f"checking out {request.sha} (refs/pull/{request.pr}/head)")
            checkout_pull(request.clone_url, request.pr, request.sha, box.recipe_dir, forge_url=settings.FORGE_URL,
                          token=settings.FORGE_TOKEN if request.private else "", stop=guard)  # fmt: skip
        guard.check()
        brought_out = files.dir / "artifacts.in"
        executor = choose_executor(
            settings,
            log.info,
            confinement=confinement_for(settings, box, network=pipeline.network),
            setup=pipeline.setup or "",
            image=pipeline.image,
            artifacts_dir=brought_out,
            on_wait=lambda text: _machine_waiting(out, text),
            interrupted=guard.is_set,
            needs_abra=pipeline.uses_abra,
        )
        # In a fork the app is the fork's own, on the fork's own swarm: no other run can touch it,
        # and two runs of one recipe may go at once. On the host the app lives on the operator's
        # swarm, shared by every run of the recipe: its lock serialises them.
        mode = "fork" if executor.own_swarm else "host"
        if mode == "host":
            holder = LockHolder.for_this_process(run_id=request.run_id, recipe=request.recipe, app_domain=domain)
            resources.enter_context(
                acquire_app_lock(
                    settings.LOCK_DIR, domain, holder, wait=settings.LOCK_WAIT,
                    # A holder that died left its app deployed: this run reaps it before taking the lock.
                    reap=lambda dead: reap_app(settings, dead),
                    on_wait=lambda h: _waiting(out, domain, h), trigger=settings.TRIGGER, stop=guard,
                )
            )  # fmt: skip
        env = {
            "RECIPE": request.recipe,
            "APP_DOMAIN": domain,
            "ABRA_DIR": str(box.abra_dir),
            "CCCI_RUN": request.run_id,
            "CCCI_SHA": request.sha or head_commit(box.recipe_dir),
            "CCCI_MODE": mode,
        }
        out.say(f"executor: {executor.name}, mode: {mode}")
        guard.check()
        files.mark_began()
        report = run_pipeline(
            pipeline,
            executor,
            box.recipe_dir,
            env,
            stop=guard,
            on_event=out.emit,
            secrets=settings.secrets(),
            run=_report_run_id(request.run_id),
            recipe=request.recipe,
            sha=env["CCCI_SHA"],
        )
        report.mode = mode
        _keep_artifacts(box.recipe_dir, brought_out, files, report, out.redact)
        if pipeline.setup and executor.name != "qemu":
            report.notes.append(f"setup skipped: the {executor.name} executor has no warm base to prepare")
        return report


def verdict_of(
    request: RunRequest,
    stop: StopRequest | None,
    report: Report | None,
    failure: Exception | None,
    redact: Callable[[str], str],
) -> Report:
    """Decide the run's final report, in one place; precedence timed_out > canceled > error > failed.

    The pipeline ran: its report, whose verdict the scheduler decided (``report.verdict``) — and a
    stop that came only once teardown had begun still shows, as the run's status and a note. It
    did not run: a stop request (canceled, timed out) says so; else the failure that kept it from
    running (a busy app, a broken ci.yml, an infrastructure error) is the run's ``error``, in its
    own words; anything else is a bug of ccci's, said as such.
    """
    if report is not None:
        if stop is not None and report.status not in ("canceled", "timed_out"):
            report.status = stop.status
            report.notes.append(f"run {stop.status.replace('_', ' ')} during teardown; teardown completed")
        return report
    if stop is not None:
        return _stopped(
            request, stop.status, f"run {stop.status.replace('_', ' ')} before its steps ran: {stop.reason}"
        )
    if isinstance(failure, AppBusy):
        return _stopped(request, "error", str(failure))
    if isinstance(failure, Stopped):  # a stop request with no guard behind it (cannot happen in a run)
        return _stopped(request, failure.request.status, str(failure))
    if isinstance(failure, (SpecError, InfraError)):
        return _stopped(request, "error", redact(str(failure)))
    log.error("ccci failed while running this", exc_info=failure)
    return _stopped(request, "error", "ccci failed while running this (see the harness log)")


def _through_gate(guard: LifetimeGuard) -> bool:
    """Wait for the starter's ``start`` line on stdin; False on end of input or a stop request."""
    line = b""
    while not guard.is_set():
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], GATE_POLL)
        if not ready:
            continue
        chunk = os.read(sys.stdin.fileno(), 64)
        if not chunk:
            return False  # the starter is gone before it let us start
        line += chunk
        if b"\n" in line:
            return line.split(b"\n", 1)[0].strip() == b"start"
    return False


def _keep_artifacts(checkout: Path, brought_out: Path, files: RunFiles, report: Report, redact: Redactor) -> None:
    """Keep what the steps left in the checkout's artifacts directory, before the ABRA_DIR goes."""
    machines = sorted(p for p in brought_out.iterdir() if p.is_dir()) if brought_out.is_dir() else []
    kept = collect_artifacts(files.artifacts, redact, checkout=checkout, brought_out=machines)
    shutil.rmtree(brought_out, ignore_errors=True)
    report.artifacts = kept.kept
    report.notes.extend(kept.notes())


def _ensure_writable(directory: Path, key: str) -> None:
    """Create ``directory`` if needed, or fail with a sentence naming the setting to change."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermanentInfraError(
            f"{key} {directory} cannot be created ({exc.strerror}); set CCCI_{key} to a directory this user can write"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermanentInfraError(
            f"{key} {directory} is not writable; set CCCI_{key} to a directory this user can write"
        )


def _waiting(out: RunOutput, domain: str, holder: LockHolder | None) -> None:
    who = f"run {holder.run_id}" if holder is not None else "another run"
    out.say(f"waiting for {domain}: {who} holds it")
    out.emit(Event(kind="waiting", step="", at=time.time(), text=f"waiting for {domain}: held by {who}"))


def _machine_waiting(out: RunOutput, text: str) -> None:
    # From the machine-booting thread: a line in the log and a "waiting" event the comment shows.
    out.say(text)
    out.emit(Event(kind="waiting", step="", at=time.time(), text=text))


def _report_run_id(run_id: str) -> int | str:
    """Return the run id as the report contract has it: a number for forge runs."""
    return int(run_id) if run_id.isdigit() else run_id


def _stopped(request: RunRequest, status: str, note: str) -> Report:
    return Report.stopped(run=_report_run_id(request.run_id), recipe=request.recipe, sha=request.sha,
                          status=status, note=note)  # fmt: skip


def confinement_for(settings: Settings, box: RunAbraDir, *, network: bool) -> Confinement:
    """Return what the steps of the run in ``box`` may touch in the process sandbox.

    Hidden: ccci's state directory (the database, every run's files, VM state), the lock
    directory, the configuration file and the home directory of the user ccci runs as.
    Writable: the run's ABRA_DIR (the checkout is in it), the operator's abra servers and
    catalogue it links to, and SANDBOX_WRITABLE.
    """
    hidden = [settings.STATE_DIR, settings.LOCK_DIR]
    if os.environ.get("CCCI_CONFIG"):
        hidden.append(Path(os.environ["CCCI_CONFIG"]))
    home = Path.home()
    if home != Path("/") and home.is_dir():
        hidden.append(home)
    shared = [settings.ABRA_HOME / name for name in box.shared]
    return Confinement(
        writable=(box.abra_dir, *shared, *map(Path, settings.SANDBOX_WRITABLE)),
        hidden=tuple(p.absolute() for p in hidden),
        owned=(box.abra_dir,),
        network=network,
        user=settings.SANDBOX_USER,
    )


def make_janitor(settings: Settings) -> Janitor:
    """Return the janitor of this host: locks, run ABRA_DIRs and VM forks of dead owners."""
    from ..vm.sweep import sweep_vms

    return Janitor(
        settings.runs_dir,
        settings.LOCK_DIR,
        leak_after=settings.LOCK_LEAK_AFTER,
        reap_app=lambda holder: reap_app(settings, holder),
        extra_sweepers=[lambda: sweep_vms(settings.STATE_DIR)],
    )


def reap_app(settings: Settings, holder: LockHolder) -> None:
    """Tear down the app of a run that died holding its lock: run the recipe's teardown steps."""
    recipe = holder.recipe
    if not is_recipe(recipe):
        log.warning("cannot reap %s: its lock names no valid recipe", holder)
        return
    pipeline = load_pipeline(ci_file_of(settings, recipe))
    teardown = tuple(s for s in pipeline.steps if s.teardown)
    if not teardown:
        return
    reaper = Pipeline(
        path=pipeline.path, steps=teardown, timeout=pipeline.timeout, env=pipeline.env, network=pipeline.network
    )
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    # The reaper's own ABRA_DIR lives in a temporary run directory, gone with everything in it.
    with (
        tempfile.TemporaryDirectory(prefix=reaper_prefix(holder.run_id), dir=settings.runs_dir) as workdir,
        RunAbraDir(Path(workdir), settings.ABRA_HOME, recipe) as box,
    ):
        env = {
            "RECIPE": recipe,
            "APP_DOMAIN": holder.app_domain,
            "ABRA_DIR": str(box.abra_dir),
            "CCCI_RUN": str(holder.run_id),
            "CCCI_SHA": "",
        }
        report = run_pipeline(
            reaper,
            BwrapExecutor(confinement=confinement_for(settings, box, network=pipeline.network)),
            box.recipe_dir,
            env,
            secrets=settings.secrets(),
            run=holder.run_id,
            recipe=recipe,
        )
    logs.for_run(log, holder.run_id).info("reaped %s of this dead run: %s", holder.app_domain, report.status)
