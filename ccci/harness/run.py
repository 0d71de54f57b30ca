"""One run, end to end — the same code under the local worker, under Drone and for ``ccci test``.

    lifetime guard (first) ─▶ quick janitor ─▶ load ci.yml ─▶ sandbox (per-run ABRA_DIR)
      ─▶ checkout of the pinned sha ─▶ app lock ─▶ pipeline (steps, then teardown steps)
      ─▶ release the lock ─▶ remove the sandbox ─▶ thorough janitor ─▶ report.json

Teardown happens in ``finally`` blocks on every path: a failed checkout, a busy app, SIGTERM
(canceled, exit 143), the deadline (timed out, exit 142), or the parent's death. The verdict
of a run that never reached its pipeline is decided here, in ``_stopped_report``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from ..config import Settings
from ..dispatch import EVENT_PREFIX, REPORT_PREFIX
from ..errors import CcciError, InfraError, PermanentInfraError, RunInterrupted, SpecError
from ..names import is_recipe, is_sha
from ..pipeline.executor import ARTIFACTS
from ..pipeline.redact import Redactor
from ..pipeline.report import Report
from ..pipeline.scheduler import Event, run_pipeline
from ..pipeline.spec import Pipeline, load_pipeline
from ..runfiles import RunFiles
from ..vm.choose import choose_executor
from .applock import AppBusy, LockHolder, acquire_app_lock
from .checkout import checkout_pull, copy_source, head_commit
from .janitor import Janitor
from .lifetime import install_guard
from .sandbox import RunSandbox

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class RunRequest:
    """What one run tests: a recipe at a pinned commit (from a forge) or a local checkout."""

    run_id: str
    recipe: str
    clone_url: str = ""
    pr: int = 0
    sha: str = ""
    source: Path | None = None  # ``ccci test``: copy this directory instead of cloning
    ci_file: Path | None = None  # ``ccci test <dir>``: this ci.yml instead of RECIPES_DIR's

    @classmethod
    def checked(cls, **fields: Any) -> RunRequest:
        """Build a request, refusing values that could escape a path or a command line."""
        request = cls(**{**fields, "run_id": str(fields["run_id"])})
        if not RUN_ID.fullmatch(request.run_id):
            raise CcciError(f"run id {request.run_id!r} is not a plain identifier")
        if not is_recipe(request.recipe):
            raise CcciError(f"recipe {request.recipe!r} is not a recipe name (lowercase letters, digits, . _ -)")
        if request.source is None and not is_sha(request.sha):
            raise CcciError(f"sha {request.sha!r} is not a 40-hex commit id")
        return request


def ci_file_for(settings: Settings, request: RunRequest) -> Path:
    """Return the ci.yml of the request's recipe, falling back to ``_default``."""
    if request.ci_file is not None:
        return request.ci_file
    own = settings.RECIPES_DIR / request.recipe / "ci.yml"
    return own if own.is_file() else settings.RECIPES_DIR / "_default" / "ci.yml"


def app_domain(settings: Settings, recipe: str) -> str:
    """Return the domain the recipe's test app is deployed at; the app lock is keyed by it."""
    return f"{recipe}.{settings.DOMAIN}"


def execute(
    settings: Settings,
    request: RunRequest,
    *,
    on_event: Callable[[Event], None] | None = None,
    echo: TextIO | None = None,
) -> tuple[dict[str, Any], int]:
    """Execute one run; return its report (as written to report.json) and the exit code.

    With ``echo`` (``ccci run``), the log, the progress events and the report are also printed
    there as they come — events and the report as ``::ccci-event``/``::ccci-report`` lines —
    which is how a Drone build's log carries them back to the worker.
    """
    files = RunFiles(settings.runs_dir, request.run_id)
    try:
        guard = install_guard(settings.RUN_TIMEOUT)  # first: from here on, teardown is certain
    except RunInterrupted as exc:  # the starter is already gone, or stopped us while installing
        files.create()
        data = _stopped_report(request, exc.status, f"run {exc.status} before it started: {exc.reason}").to_dict()
        files.write_report(data)
        return data, exc.exit_code
    files.create()
    redact = Redactor(settings.secrets())
    started, t0 = time.time(), time.monotonic()
    report: Report | None = None
    release: Callable[[], None] | None = None
    janitor = make_janitor(settings)
    log_file = files.log.open("a", encoding="utf-8")

    def write_log(line: str) -> None:
        log_file.write(line)
        log_file.flush()
        if echo:
            echo.write(line)
            echo.flush()

    def emit(event: Event) -> None:
        if event.kind == "output":
            write_log(f"[{event.step}] {event.text}\n")
            return
        data = {k: v for k, v in asdict(event).items() if v is not None}
        files.append_event(data)
        if echo:
            echo.write(EVENT_PREFIX + json.dumps(data) + "\n")
            echo.flush()
        if on_event:
            on_event(event)

    def say(text: str) -> None:
        write_log(f"[ccci] {redact(text)}\n")

    try:
        _ensure_writable(settings.LOCK_DIR, "LOCK_DIR")
        janitor.quick()
        pipeline = load_pipeline(ci_file_for(settings, request))
        guard.set_deadline(min(pipeline.timeout, settings.RUN_TIMEOUT))
        domain = app_domain(settings, request.recipe)
        with RunSandbox(files.dir, settings.ABRA_HOME, request.recipe, keep=settings.KEEP_SANDBOX) as box:
            if request.source is not None:
                say(f"copying {request.source}")
                copy_source(request.source, box.recipe_dir)
            else:
                say(f"checking out {request.sha} (refs/pull/{request.pr}/head)")
                checkout_pull(
                    request.clone_url,
                    request.pr,
                    request.sha,
                    box.recipe_dir,
                    forge_url=settings.FORGE_URL,
                    token=settings.FORGE_TOKEN,
                )
            holder = LockHolder.for_this_process(run_id=request.run_id, recipe=request.recipe, app_domain=domain)
            release = acquire_app_lock(
                settings.LOCK_DIR,
                domain,
                holder,
                wait=settings.LOCK_WAIT,
                # A holder that dies while we wait left its app deployed: we reap it ourselves.
                reap=lambda dead: reap_app(settings, dead),
                on_wait=lambda h: _waiting(emit, say, domain, h),
                trigger=settings.TRIGGER,
            )
            env = {
                "RECIPE": request.recipe,
                "APP_DOMAIN": domain,
                "ABRA_DIR": str(box.abra_dir),
                "CCCI_RUN": request.run_id,
                "CCCI_SHA": request.sha or head_commit(box.recipe_dir),
            }
            writable = [box.abra_dir, settings.ABRA_HOME, *map(Path, settings.SANDBOX_WRITABLE)]
            executor = choose_executor(
                settings, log.info, writable=writable, setup=pipeline.setup or "", image=pipeline.image,
                on_wait=lambda text: _machine_waiting(emit, say, text),
                interrupted=lambda: guard.interrupted is not None,
            )  # fmt: skip
            say(f"executor: {executor.name}")
            report = run_pipeline(
                pipeline,
                executor,
                box.recipe_dir,
                env,
                on_event=emit,
                secrets=settings.secrets(),
                run=_report_run_id(request.run_id),
                recipe=request.recipe,
                sha=env["CCCI_SHA"],
                on_teardown=guard.begin_teardown,
            )
            _keep_artifacts(box.recipe_dir, files, report)
            if pipeline.setup and executor.name != "qemu":
                report.notes.append(f"setup skipped: the {executor.name} executor has no warm base to prepare")
    except RunInterrupted as exc:
        report = _stopped_report(request, exc.status, f"run {exc.status.replace('_', ' ')} before its steps ran")
    except AppBusy as exc:
        report = _stopped_report(request, "error", str(exc))
    except (SpecError, InfraError) as exc:
        report = _stopped_report(request, "error", redact(str(exc)))
    except Exception:
        log.exception("run %s: ccci failed", request.run_id)
        report = _stopped_report(request, "error", "ccci failed while running this (see the harness log)")
    finally:
        guard.begin_teardown()
        if release is not None:
            release()
        try:
            janitor.thorough()
        except Exception:  # the sweep is a safety net; it must not cost the run its report
            log.exception("janitor failed")
        if report is None:  # interrupted inside this finally's own steps: still exactly one report
            report = _stopped_report(request, "error", "ccci failed while running this (see the harness log)")
        stop = guard.interrupted
        if stop is not None and report.status not in ("canceled", "timed_out"):
            # The signal came during teardown, which it did not cut short; the verdict says it came.
            report.status = stop.status
            report.notes.append(f"run {stop.status.replace('_', ' ')} during teardown; teardown completed")
        report.total_ms = int((time.monotonic() - t0) * 1000)
        report.started_at = report.started_at or started
        data = json.loads(redact(report.to_json()))
        files.write_report(data)
        if echo:
            echo.write(REPORT_PREFIX + json.dumps(data) + "\n")
            echo.flush()
        log_file.close()
        guard.uninstall()
    return data, guard.exit_code(0 if report.passed else 1)


def _keep_artifacts(checkout: Path, files: RunFiles, report: Report) -> None:
    """Keep what the steps left in the checkout's artifacts directory, before the sandbox goes."""
    source = checkout / ARTIFACTS
    if not source.is_dir():
        return
    shutil.copytree(source, files.artifacts, symlinks=False, dirs_exist_ok=True, ignore_dangling_symlinks=True)
    report.artifacts = sorted(str(p.relative_to(files.artifacts)) for p in files.artifacts.rglob("*") if p.is_file())


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


def _waiting(emit, say, domain: str, holder: Any) -> None:
    who = f"run {holder.run_id}" if holder is not None else "another run"
    say(f"waiting for {domain}: {who} holds it")
    emit(Event(kind="waiting", step="", at=time.time(), text=f"waiting for {domain}: held by {who}"))


def _machine_waiting(emit, say, text: str) -> None:
    # From the machine-booting thread: a line in the log and a "waiting" event the comment shows.
    say(text)
    emit(Event(kind="waiting", step="", at=time.time(), text=text))


def _report_run_id(run_id: str) -> int | str:
    """Return the run id as the report contract has it: a number for forge runs."""
    return int(run_id) if run_id.isdigit() else run_id


def _stopped_report(request: RunRequest, status: str, note: str) -> Report:
    return Report(
        run=_report_run_id(request.run_id),
        recipe=request.recipe,
        sha=request.sha,
        status=status,
        total_ms=0,
        steps=[],
        notes=[note],
    )


def make_janitor(settings: Settings) -> Janitor:
    """Return the janitor of this host: locks, sandboxes and VM forks of dead owners."""
    from ..vm.sweep import sweep_vms

    return Janitor(
        settings.runs_dir,
        settings.LOCK_DIR,
        leak_after=settings.LOCK_LEAK_AFTER,
        reap_app=lambda holder: reap_app(settings, holder),
        extra_sweepers=[lambda: sweep_vms(settings.STATE_DIR)],
    )


def reap_app(settings: Settings, holder: Any) -> None:
    """Tear down the app of a run that died holding its lock: run the recipe's teardown steps."""
    from ..vm.process import ProcessExecutor

    recipe = getattr(holder, "recipe", "") or ""
    if not is_recipe(recipe):
        log.warning("cannot reap %s: its lock names no valid recipe", holder)
        return
    pipeline = load_pipeline(ci_file_for(settings, RunRequest(run_id="reap", recipe=recipe)))
    teardown = tuple(s for s in pipeline.steps if s.teardown)
    if not teardown:
        return
    reaper = Pipeline(path=pipeline.path, steps=teardown, timeout=pipeline.timeout, env=pipeline.env)
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    # The reaper's own sandbox lives in a temporary run directory, gone with everything in it.
    with (
        tempfile.TemporaryDirectory(prefix=f"reap-{holder.run_id}-", dir=settings.runs_dir) as workdir,
        RunSandbox(Path(workdir), settings.ABRA_HOME, recipe) as box,
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
            ProcessExecutor(writable=[box.abra_dir, settings.ABRA_HOME, *map(Path, settings.SANDBOX_WRITABLE)]),
            box.recipe_dir,
            env,
            secrets=settings.secrets(),
            run=holder.run_id,
            recipe=recipe,
        )
    log.info("reaped %s of dead run %s: %s", holder.app_domain, holder.run_id, report.status)
