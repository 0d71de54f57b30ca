"""Local dispatch: each run is a child process ``python -m ccci run …`` on this host.

The child is the harness (lifetime guard, ABRA_DIR, app lock, executor, pipeline). Starting one is a
handshake, so that no harness ever runs a step unless the store knows of it:

    spawn ``setpriv --pdeathsig TERM python -m ccci run … --parent-pid <worker> --gate``
      │  the death signal is armed before the harness' first instruction; it dies with us
      ├─ record ``<pid>:<start time>`` as the run's dispatch reference (the worker's callback)
      └─ write ``start`` to its stdin: only now does it touch the run's directory

A worker that dies before ``start`` leaves a harness that reads end-of-input and exits without
a trace; one that dies after it leaves a harness that gets SIGTERM, and that writes no report
if its pipeline had not begun (the run is simply started again) or reports itself canceled.
The spawn happens on the worker's main thread: PDEATHSIG follows the thread that forked.

A cancel is SIGTERM to the harness' process group (it tears down). A harness that outlives
``RUN_TIMEOUT + RUN_GRACE`` is killed with SIGKILL: the safety net under its own deadline.
A thread per run waits for its exit; one that ended without a report (killed, crashed) has what
it left cleaned up — its app reaped, its lock and ABRA_DIR removed, its VM forks swept — before
the worker hears of it, so that the final report can say truthfully what is left. After a
worker restart, a run still marked running is adopted: a live harness (same pid *and* start
time) is watched through a pidfd; a dead one's leftovers are collected.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import logs
from ..config import Settings
from ..doorbell import Doorbell
from ..harness.abradir import sweep_abra_dirs
from ..harness.applock import probe_and_reap
from ..harness.request import RunRequest
from ..harness.run import app_domain, make_janitor, needs_forge_token, reap_app
from ..harness.runfiles import RunFiles
from ..harness.wire import ProgressReader, report_from
from ..pids import process_start_time
from ..pipeline.redact import Redactor
from ..store import Run
from . import Finished

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class _Child:
    """A harness this dispatcher watches: its process, its run and its hard deadline."""

    run: Run
    pid: int
    deadline: float  # epoch seconds; past it the harness is killed
    proc: subprocess.Popen | None = None  # None when adopted after a restart
    killed: str = ""  # why this side killed it, if it did


class LocalDispatcher:
    """Starts, cancels, watches and adopts harness processes on this host."""

    poll_interval = 1.0

    def __init__(self, settings: Settings, doorbell: Doorbell | None = None):
        self.settings = settings
        self.doorbell = doorbell
        self._children: dict[int, _Child] = {}  # run id -> its harness
        self._finished: list[Finished] = []
        self._progress = ProgressReader(settings.runs_dir)
        self._lock = threading.Lock()

    def harness_argv(self, run: Run) -> list[str]:
        """Return the command line that runs the harness for ``run`` (its parent: this process; gated)."""
        request = RunRequest.from_run(run, parent_pid=os.getpid(), gate=True)
        return [sys.executable, "-m", "ccci", "run", *request.to_argv()]

    def harness_env(self, run: Run) -> dict[str, str]:
        """Return the harness' environment: ccci's settings without the secrets a run does not need.

        No webhook secret, admin token or Drone token ever; the forge token only when the
        checkout (a private repository) or a step (``from_env: CCCI_FORGE_TOKEN``) needs it.
        The configuration file is not named: its values come resolved, its tokens not at all.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("CCCI_")}
        env.update(self.settings.to_env(secrets=False))
        if needs_forge_token(self.settings, run.recipe, private=bool(run.private)):
            env["CCCI_FORGE_TOKEN"] = self.settings.FORGE_TOKEN
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        return env

    def start(self, run: Run, record: Callable[[str], object] | None = None) -> str:
        """Start the harness for ``run``, ``record`` its reference, then let it begin; return the reference."""
        files = RunFiles(self.settings.runs_dir, run.id)
        files.create()
        with (files.dir / "harness.log").open("ab") as out:
            proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "TERM", "--", *self.harness_argv(run)],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.harness_env(run),
                cwd=REPO_ROOT,
                # The harness makes itself a session leader first thing; its process group is
                # what a cancel signals.
            )
        ref = f"{proc.pid}:{process_start_time(proc.pid)}"
        child = _Child(run, proc.pid, self._deadline(run), proc)
        try:
            if record is not None:
                record(ref)
        except BaseException:
            proc.kill()  # never recorded: it must never run (it has not passed the gate)
            proc.wait()
            raise
        with self._lock:
            self._children[run.id] = child
        try:
            assert proc.stdin is not None
            proc.stdin.write(b"start\n")
            proc.stdin.close()
        except OSError:
            pass  # it died already; its waiter reports it
        threading.Thread(target=self._wait_child, args=(child,), name=f"run-{run.id}", daemon=True).start()
        logs.for_run(log, run.id).info("started as pid %s", proc.pid)
        return ref

    def adopt(self, run: Run) -> None:
        """Watch the harness of a run started before this worker, or collect what it left."""
        pid, start_time = _parse_ref(run.dispatch_ref)
        if pid and process_start_time(pid) == start_time and _is_harness_of(pid, run.id):
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                pidfd = None
            if pidfd is not None:
                child = _Child(run, pid, self._deadline(run))
                with self._lock:
                    self._children[run.id] = child
                threading.Thread(target=self._wait_pidfd, args=(child, pidfd), daemon=True).start()
                logs.for_run(log, run.id).info("adopted its live harness, pid %s", pid)
                return
        threading.Thread(
            target=self._collect, args=(run, "its harness was gone when the worker restarted"), daemon=True
        ).start()

    def active(self) -> set[int]:
        """Return the ids of runs whose harness is alive (or being cleaned up after)."""
        with self._lock:
            return set(self._children)

    def poll(self) -> list[Finished]:
        """Kill harnesses past their hard deadline; return (and forget) the runs that ended since."""
        now = time.time()
        with self._lock:
            late = [c for c in self._children.values() if now > c.deadline and not c.killed]
        for child in late:
            child.killed = (
                f"its harness outlived the run's deadline (RUN_TIMEOUT {self.settings.RUN_TIMEOUT:g} s "
                f"plus RUN_GRACE {self.settings.RUN_GRACE:g} s) and was killed"
            )
            logs.for_run(log, child.run.id).error("%s", child.killed)
            _kill_group(child.pid, signal.SIGKILL)
        with self._lock:
            done, self._finished = self._finished, []
        return done

    def progress(self, run: Run) -> list[dict[str, Any]]:
        """Return the run's progress events so far."""
        return self._progress.progress(run.id)

    def cancel(self, run: Run) -> bool:
        """Send SIGTERM to the run's process group; the harness tears down and reports canceled."""
        with self._lock:
            child = self._children.get(run.id)
        if child is None:
            return False
        return _kill_group(child.pid, signal.SIGTERM)

    def sweep(self) -> str:
        """Free what dead runs of this host left behind (the periodic safety net); return a summary."""
        return make_janitor(self.settings).thorough().summary()

    # -- inside ----------------------------------------------------------------------------------

    def _deadline(self, run: Run) -> float:
        return (run.started_at or time.time()) + self.settings.RUN_TIMEOUT + self.settings.RUN_GRACE

    def _wait_child(self, child: _Child) -> None:
        assert child.proc is not None
        code = child.proc.wait()
        self._collect(child.run, child.killed or f"its harness exited with status {code}")

    def _wait_pidfd(self, child: _Child, pidfd: int) -> None:
        try:
            select.select([pidfd], [], [])  # readable once the process has exited
        finally:
            os.close(pidfd)
        self._collect(child.run, child.killed or "its harness (adopted after a worker restart) ended")

    def _collect(self, run: Run, reason: str) -> None:
        files = RunFiles(self.settings.runs_dir, run.id)
        if files.scrub(Redactor(self.settings.secrets()).redact_bytes):
            logs.for_run(log, run.id).warning("its files held a secret the harness did not know; redacted")
        report = report_from(files.read_report())
        finished = Finished(run.id, report, reason)
        if report is None and not files.has_begun():
            finished.requeue = True  # nothing ran: the run can simply start again
        if report is None:
            finished.cleanup = self._clean_up_after(run)
        with self._lock:
            killed = self._children.pop(run.id, None)
            finished.timed_out = bool(killed and killed.killed)
            self._finished.append(finished)
        self._progress.forget(run.id)
        if self.doorbell:
            self.doorbell.ring()

    def _clean_up_after(self, run: Run) -> str:
        """Free what a harness that died without its own teardown left; say what is left, if anything."""
        left = []
        domain = app_domain(self.settings, run.recipe)
        try:
            probe_and_reap(self.settings.LOCK_DIR, lambda holder: reap_app(self.settings, holder), app_domain=domain)
        except Exception as exc:
            logs.for_run(log, run.id).exception("reaping %s failed", domain)
            left.append(f"the app {domain} ({exc})")
        try:
            sweep_abra_dirs(self.settings.runs_dir)
        except OSError as exc:
            left.append(f"its ABRA_DIR ({exc})")
        try:
            from ..vm.sweep import sweep_vms

            sweep_vms(self.settings.STATE_DIR)
        except Exception as exc:
            left.append(f"its VM forks ({exc})")
        if (self.settings.LOCK_DIR / f"{domain}.lock").exists():
            left.append(f"the lock of {domain}")
        if RunFiles(self.settings.runs_dir, run.id).abra_dir_exists():
            left.append("its ABRA_DIR")
        if not left:
            return "its app, lock and ABRA_DIR were cleaned up"
        return f"left behind: {', '.join(left)}; the worker's next sweep, or `ccci sweep`, removes them"


def _parse_ref(ref: str | None) -> tuple[int, int | None]:
    """Split a dispatch reference ``<pid>:<start time>`` (or an older plain ``<pid>``)."""
    pid, _, started = (ref or "").partition(":")
    if not pid.isdigit():
        return 0, None
    return int(pid), int(started) if started.isdigit() else process_start_time(int(pid))


def _kill_group(pid: int, sig: int) -> bool:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        # Not yet its own process group (the guard makes it one first thing): signal it alone.
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
    return True


def _is_harness_of(pid: int, run_id: int) -> bool:
    """Tell whether ``pid`` is (still) the harness of ``run_id``, not a reused pid."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"ccci" in argv and b"run" in argv and str(run_id).encode() in argv
