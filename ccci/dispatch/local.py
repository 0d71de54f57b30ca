"""Local dispatch: each run is a child process ``python -m ccci run …`` on this host.

The child is the harness (lifetime guard, sandbox, app lock, pipeline). This side starts it
from the worker's main thread (the harness' PDEATHSIG follows the thread that spawned it),
cancels it with SIGTERM to its process group (the harness tears down on SIGTERM), and learns
of its exit from a thread that waits on it and rings the doorbell. After a worker restart, a
run still marked running is adopted: if its harness lives on it is watched through a pidfd;
if it is gone, whatever report it left is collected.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from .. import logs
from ..config import Settings
from ..doorbell import Doorbell
from ..runfiles import RunFiles
from ..store import Run
from . import Finished, ProgressReader

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


class LocalDispatcher:
    """Starts, cancels, watches and adopts harness processes on this host."""

    def __init__(self, settings: Settings, doorbell: Doorbell | None = None):
        self.settings = settings
        self.doorbell = doorbell
        self._pids: dict[int, int] = {}  # run id -> harness pid (its process group id too)
        self._finished: list[Finished] = []
        self._progress = ProgressReader(settings.runs_dir)
        self._lock = threading.Lock()

    def harness_argv(self, run: Run) -> list[str]:
        """Return the command line that runs the harness for ``run``."""
        return [
            sys.executable, "-m", "ccci", "run",
            "--run-id", str(run.id),
            "--recipe", run.recipe,
            "--clone-url", run.clone_url,
            "--pr", str(run.pr),
            "--sha", str(run.sha),
        ]  # fmt: skip

    def start(self, run: Run) -> str:
        """Start the harness for ``run``; return its pid as the dispatch reference."""
        files = RunFiles(self.settings.runs_dir, run.id)
        files.create()
        env = {**os.environ, **self.settings.to_env()}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        with (files.dir / "harness.log").open("ab") as out:
            proc = subprocess.Popen(
                self.harness_argv(run),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO_ROOT,
                # The harness makes itself a session leader first thing; its process group is
                # what a cancel signals.
            )
        with self._lock:
            self._pids[run.id] = proc.pid
        threading.Thread(target=self._wait_child, args=(run.id, proc), name=f"run-{run.id}", daemon=True).start()
        logs.for_run(log, run.id).info("started as pid %s", proc.pid)
        return str(proc.pid)

    def adopt(self, run: Run) -> None:
        """Watch the harness of a run started before this worker, or collect what it left."""
        pid = int(run.dispatch_ref) if (run.dispatch_ref or "").isdigit() else 0
        if pid and _is_harness_of(pid, run.id):
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                pidfd = None
            if pidfd is not None:
                with self._lock:
                    self._pids[run.id] = pid
                threading.Thread(target=self._wait_pidfd, args=(run.id, pidfd), daemon=True).start()
                logs.for_run(log, run.id).info("adopted its live harness, pid %s", pid)
                return
        self._collect(run.id, "its harness was gone when the worker restarted")

    def active(self) -> set[int]:
        """Return the ids of runs whose harness is alive."""
        with self._lock:
            return set(self._pids)

    def poll(self) -> list[Finished]:
        """Return (and forget) the runs whose harness ended since the last call."""
        with self._lock:
            done, self._finished = self._finished, []
        return done

    def progress(self, run: Run) -> list[dict[str, Any]]:
        """Return the run's progress events so far."""
        return self._progress.progress(run.id)

    def cancel(self, run: Run) -> bool:
        """Send SIGTERM to the run's process group; the harness tears down and reports canceled."""
        with self._lock:
            pid = self._pids.get(run.id)
        if not pid:
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            # Not yet its own process group (the guard makes it one first thing): signal it alone.
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return False
        return True

    def _wait_child(self, run_id: int, proc: subprocess.Popen) -> None:
        self._collect(run_id, f"its harness exited with status {proc.wait()}")

    def _wait_pidfd(self, run_id: int, pidfd: int) -> None:
        try:
            select.select([pidfd], [], [])  # readable once the process has exited
        finally:
            os.close(pidfd)
        self._collect(run_id, "its harness (adopted after a worker restart) ended")

    def _collect(self, run_id: int, reason: str) -> None:
        report = RunFiles(self.settings.runs_dir, run_id).read_report()
        with self._lock:
            self._pids.pop(run_id, None)
            self._finished.append(Finished(run_id, report, reason))
        self._progress.forget(run_id)
        if self.doorbell:
            self.doorbell.ring()


def _is_harness_of(pid: int, run_id: int) -> bool:
    """Tell whether ``pid`` is (still) the harness of ``run_id``, not a reused pid."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"ccci" in argv and b"run" in argv and str(run_id).encode() in argv
