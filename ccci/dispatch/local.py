"""Local dispatch: each run is a child process ``python -m ccci run …`` in its own session.

The child is the harness (lifetime guard, sandbox, app lock, pipeline); this side only starts
it, cancels it with SIGTERM to its process group (the harness tears down on SIGTERM), and
notices when it exits. A thread per child waits on it and rings the doorbell, so the worker
learns of an exit at once instead of polling for it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from ..doorbell import Doorbell
from ..runfiles import RunFiles
from ..store import Run

log = logging.getLogger(__name__)


@dataclass
class Exited:
    """A run process that ended, with its exit status."""

    run_id: int
    returncode: int


class LocalDispatcher:
    """Starts, cancels and reaps run processes on this host."""

    def __init__(self, settings: Settings, doorbell: Doorbell | None = None):
        self.settings = settings
        self.doorbell = doorbell
        self._procs: dict[int, subprocess.Popen] = {}
        self._exited: list[Exited] = []
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

    def start(self, run: Run) -> int:
        """Start the harness for ``run``; return its pid."""
        files = RunFiles(self.settings.runs_dir, run.id)
        files.create()
        env = {**os.environ, **self.settings.to_env()}
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")])
        )
        with (files.dir / "harness.log").open("ab") as out:
            proc = subprocess.Popen(
                self.harness_argv(run),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: a cancel reaches every child
            )
        with self._lock:
            self._procs[run.id] = proc
        threading.Thread(target=self._wait, args=(run.id, proc), name=f"run-{run.id}", daemon=True).start()
        log.info("run %s started as pid %s", run.id, proc.pid)
        return proc.pid

    def _wait(self, run_id: int, proc: subprocess.Popen) -> None:
        returncode = proc.wait()
        with self._lock:
            self._procs.pop(run_id, None)
            self._exited.append(Exited(run_id, returncode))
        if self.doorbell:
            self.doorbell.ring()

    def running(self) -> set[int]:
        """Return the ids of runs whose process is alive."""
        with self._lock:
            return set(self._procs)

    def exited(self) -> list[Exited]:
        """Return (and forget) the runs whose process ended since the last call."""
        with self._lock:
            done, self._exited = self._exited, []
        return done

    def cancel(self, run: Run) -> bool:
        """Send SIGTERM to the run's process group; the harness tears down and reports canceled."""
        with self._lock:
            proc = self._procs.get(run.id)
        pid = proc.pid if proc else run.worker_pid
        if not pid:
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True

    def shutdown(self) -> None:
        """Cancel every run still going and wait for them (they tear down on SIGTERM)."""
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            proc.wait()
