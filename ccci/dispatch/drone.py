"""Drone dispatch (``DISPATCH=drone``): each run is a custom build of ``DRONE_REPO``'s recipe-ci pipeline.

    start  ─▶ POST /api/repos/{owner}/{name}/builds?CCCI_RUN=…&CCCI_RECIPE=…   (one build per run)
    poll   ─▶ GET  …/builds/{number}                 build, stages[], steps[]
           ─▶ GET  …/builds/{number}/logs/{stage}/{step}   the harness step's log, read onward
    cancel ─▶ DELETE …/builds/{number}               the exec runner SIGKILLs the step shell;
                                                     the harness (its child) tears down and reports

Polling is the source of truth: nothing waits for a callback that could be lost. Each poll reads
the log of the ``run`` step of the ``recipe-ci`` stage from where it stopped. ``::ccci-event``
lines become the run's progress events, the last ``::ccci-report`` line is its report, every
other line is appended to the run's local log — so the run page reads a Drone run from the same
``RunFiles`` as a local one. How far the log has been read is kept in the run's directory, so a
restarted worker that adopts the build neither loses nor repeats lines. Shapes follow
docs/protocols.md §3.

Errors from ``start`` (``errors.py`` tree; nothing is sent unless every parameter is valid):

    CcciError            a parameter of the run is not acceptable (validated here, again in the harness)
    ConfigError          Drone matched no pipeline (body ``null``), or refused DRONE_TOKEN /
                         does not know DRONE_REPO (401/403/404): an operator must fix the setup
    PermanentInfraError  any other 4xx, or an answer that is not a Build
    TransientInfraError  Drone unreachable, timed out, 429 or 5xx: try again later

The token travels in the ``Authorization`` header only, never in a URL, an error or a log line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from .. import logs
from ..config import Settings
from ..errors import CcciError, ConfigError, PermanentInfraError, TransientInfraError
from ..harness.request import RunRequest
from ..harness.runfiles import RunFiles
from ..harness.wire import ProgressReader, parse_harness_line, report_from
from ..pipeline.redact import Redactor
from ..store import Run
from . import Finished

log = logging.getLogger(__name__)

STAGE = "recipe-ci"  # the pipeline of .drone.yml that runs the harness...
STEP = "run"  # ...and its step whose log carries the harness' lines
TERMINAL = frozenset({"success", "failure", "killed", "error", "skipped", "declined"})  # core/status.go
TIMEOUT = (5.0, 20.0)  # connect, read: the worker's loop waits on these
POSITION_FILE = "drone.json"  # in the run's directory: which build, and how far its log was read
MISSING = object()  # what _request returns for a 404 it was told to expect

POSITIVE = re.compile(r"^[1-9][0-9]{0,17}$")


@dataclass
class _Watch:
    """One build being watched: whose run it is and how far its harness log has been read."""

    run_id: int
    number: int
    next_pos: int = 0  # the first log line (Drone's ``pos``) not yet taken
    partial: str = ""  # a line whose end has not arrived yet
    report: dict[str, Any] | None = None
    cancel_pending: bool = False  # a cancel Drone has not acknowledged yet: retried each poll
    deadline: float = float("inf")  # epoch seconds past which the build is canceled (RUN_TIMEOUT + grace)
    timed_out: bool = False


class DroneDispatcher:
    """Starts runs as Drone custom builds, follows them by polling, cancels and adopts them."""

    def __init__(
        self,
        settings: Settings,
        *,
        session: requests.Session | None = None,
        poll_interval: float = 2.0,
        branch: str | None = None,
    ):
        if not (settings.DRONE_URL and settings.DRONE_TOKEN and settings.DRONE_REPO):
            raise ConfigError("DRONE_URL", "DISPATCH=drone needs DRONE_URL, DRONE_TOKEN and DRONE_REPO")
        self.settings = settings
        self.poll_interval = poll_interval
        self._progress = ProgressReader(settings.runs_dir)
        self.branch = branch  # None: Drone builds the repository's default branch
        self.base = settings.DRONE_URL.rstrip("/")
        self.api = f"{self.base}/api/repos/{settings.DRONE_REPO}"
        self._own_session = session is None
        self.session = session or requests.Session()
        self._watches: dict[int, _Watch] = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"DroneDispatcher({self.api!r})"

    def close(self) -> None:
        """Close the HTTP session if this dispatcher made it."""
        if self._own_session:
            self.session.close()

    def __enter__(self) -> DroneDispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def link(self, number: int | str) -> str:
        """Return the Drone web page of build ``number``."""
        return f"{self.base}/{self.settings.DRONE_REPO}/{number}"

    # -- the Dispatcher protocol -----------------------------------------------------------------

    def start(self, run: Run, record: Callable[[str], object] | None = None) -> str:
        """Trigger a custom build for ``run``, ``record`` its number and return it (the dispatch reference)."""
        params = build_params(run)  # raises before anything is sent
        # A start that failed in flight (timeout, 5xx) may still have created the build: find it
        # rather than make a second build of the same run.
        number = self._find_build_of(run.id)
        if number is None:
            query = ({"branch": self.branch} if self.branch else {}) | params
            data = self._request("POST", "/builds", params=query, what="trigger a build")
            if data is None:
                raise ConfigError(
                    "DRONE_REPO",
                    f"Drone matched no pipeline for this custom build: check that .drone.yml in "
                    f"{self.settings.DRONE_REPO} has a pipeline with trigger event custom",
                )
            if not isinstance(data, dict) or not isinstance(data.get("number"), int):
                raise PermanentInfraError(
                    f"Drone answered the build trigger with something that is not a build: {data!r:.200}"
                )
            number = data["number"]
            logs.for_run(log, run.id).info("started as Drone build %s (%s)", number, self.link(number))
        else:
            logs.for_run(log, run.id).info("found its Drone build %s from an earlier attempt", number)
        if record is not None:
            record(str(number))
        self._watch(run, number)
        return str(number)

    def adopt(self, run: Run) -> None:
        """Watch the Drone build of a run started before this worker restarted."""
        ref = run.dispatch_ref or ""
        if not POSITIVE.fullmatch(ref):
            with self._lock:
                # No build to follow: report it on the next poll, like any other ending.
                self._watches[run.id] = _Watch(run.id, 0)
            return
        self._watch(run, int(ref))
        logs.for_run(log, run.id).info("adopted Drone build %s", ref)

    def active(self) -> set[int]:
        """Return the ids of runs whose Drone build is being watched."""
        with self._lock:
            return set(self._watches)

    def poll(self) -> list[Finished]:
        """Read every watched build's state and log; return (and forget) the builds that ended."""
        with self._lock:
            watches = list(self._watches.values())
        done = []
        for watch in watches:
            try:
                finished = self._poll_one(watch)
            except CcciError as exc:
                # Drone is down, slow or refusing: the build goes on regardless; look again next poll.
                logs.for_run(log, watch.run_id).warning("polling Drone build %s: %s", watch.number, exc)
                continue
            if finished is not None:
                with self._lock:
                    self._watches.pop(watch.run_id, None)
                self._progress.forget(watch.run_id)
                done.append(finished)
        return done

    def progress(self, run: Run) -> list[dict[str, Any]]:
        """Return the run's progress events read from its build log so far."""
        return self._progress.progress(run.id)

    def cancel(self, run: Run) -> bool:
        """Cancel the run's Drone build; False if this dispatcher is not watching one."""
        with self._lock:
            watch = self._watches.get(run.id)
        if watch is None or watch.number == 0:
            return False
        watch.cancel_pending = True
        self._send_cancel(watch)
        return True

    # -- inside ----------------------------------------------------------------------------------

    def sweep(self) -> str:
        """Nothing to sweep here: each runner host's own harness runs sweep what dead runs left there."""
        return ""

    def _watch(self, run: Run, number: int) -> None:
        run_id = run.id
        files = RunFiles(self.settings.runs_dir, run_id)
        files.create()
        deadline = (run.started_at or time.time()) + self.settings.RUN_TIMEOUT + self.settings.RUN_GRACE
        watch = _Watch(run_id, number, deadline=deadline)
        saved = _read_position(files)
        if saved.get("number") == number:  # adopted: carry on from where the last worker stopped
            watch.next_pos = int(saved.get("next_pos", 0))
            watch.partial = str(saved.get("partial", ""))
            watch.report = saved.get("report")
        else:
            _write_position(files, watch)
        with self._lock:
            self._watches[run_id] = watch

    def _send_cancel(self, watch: _Watch) -> None:
        try:
            self._request("DELETE", f"/builds/{watch.number}", what="cancel a build")
        except CcciError as exc:
            logs.for_run(log, watch.run_id).warning(
                "canceling Drone build %s (retried next poll): %s", watch.number, exc
            )
            return
        watch.cancel_pending = False
        logs.for_run(log, watch.run_id).info("canceled Drone build %s", watch.number)

    def _poll_one(self, watch: _Watch) -> Finished | None:
        if watch.number == 0:
            return Finished(watch.run_id, None, "it had no Drone build number when the worker restarted")
        if not watch.timed_out and time.time() > watch.deadline:
            logs.for_run(log, watch.run_id).error("Drone build %s outlived its deadline; canceling it", watch.number)
            watch.timed_out = watch.cancel_pending = True
        if watch.cancel_pending:
            self._send_cancel(watch)
        build = self._request("GET", f"/builds/{watch.number}", what="read a build", missing_ok=True)
        if build is MISSING:
            return Finished(watch.run_id, None, f"its Drone build {self.link(watch.number)} no longer exists")
        if not isinstance(build, dict):
            raise TransientInfraError(f"Drone answered build {watch.number} with something that is not a build")
        status = str(build.get("status", ""))
        stage, step = _harness_step(build)
        terminal = status in TERMINAL
        if stage is not None and step is not None and step.get("status") not in (None, "pending", "skipped"):
            self._read_log(watch, stage["number"], step["number"], final=terminal)
        if not terminal:
            return None
        if watch.report is not None:
            return Finished(watch.run_id, report_from(watch.report), f"the Drone build ended {status}")
        why = f": {build['error']}" if build.get("error") else ""
        reason = f"the Drone build {self.link(watch.number)} ended {status} without a report{why}"
        if watch.timed_out:
            reason = f"the Drone build {self.link(watch.number)} outlived RUN_TIMEOUT plus RUN_GRACE and was canceled"
        cleanup = "anything it left on its runner host is removed by the next run's sweep there (or `ccci sweep`)"
        return Finished(watch.run_id, None, reason, timed_out=watch.timed_out, cleanup=cleanup)

    def _read_log(self, watch: _Watch, stage: int, step: int, *, final: bool) -> None:
        path = f"/builds/{watch.number}/logs/{stage}/{step}"
        entries = self._request("GET", path, what="read a build log", missing_ok=True)
        if not isinstance(entries, list):  # MISSING: no log stored yet (or ever, for a step that never ran)
            entries = []
        text = watch.partial
        for entry in sorted((e for e in entries if isinstance(e, dict)), key=lambda e: int(e.get("pos", 0))):
            if int(entry.get("pos", 0)) >= watch.next_pos:
                text += str(entry.get("out", ""))
                watch.next_pos = int(entry.get("pos", 0)) + 1
        lines = text.split("\n")
        rest = lines.pop()  # after the last newline: a line whose end has not arrived yet
        if final and rest:  # the build is over: no more of this line will come
            lines.append(rest)
            rest = ""
        files = RunFiles(self.settings.runs_dir, watch.run_id)
        redact = Redactor(self.settings.secrets())  # a step's log holds what the runner's harness did not know
        plain = []
        for line in lines:
            line = redact(line.removesuffix("\r"))
            parsed = parse_harness_line(line)
            if parsed is None:
                plain.append(line + "\n")
            elif parsed[0] == "event":
                files.append_event(parsed[1])
            else:
                watch.report = parsed[1]  # the last report line wins
                files.write_report(parsed[1])
        if plain:
            with files.log.open("a", encoding="utf-8") as f:
                f.writelines(plain)
        watch.partial = rest
        _write_position(files, watch)

    def _find_build_of(self, run_id: int) -> int | None:
        """Return the number of a recent build already triggered for ``run_id``, if any."""
        builds = self._request("GET", "/builds", params={"page": 1, "per_page": 50}, what="list builds")
        for build in builds if isinstance(builds, list) else []:
            params = build.get("params") if isinstance(build, dict) else None
            if (
                isinstance(params, dict)
                and params.get("CCCI_RUN") == str(run_id)
                and isinstance(build.get("number"), int)
            ):
                return build["number"]
        return None

    def _request(
        self, method: str, path: str, *, what: str, params: dict[str, Any] | None = None, missing_ok: bool = False
    ) -> Any:
        """Call the Drone API; return the decoded JSON body (None for ``null``) or raise by the error tree.

        With ``missing_ok``, a 404 returns ``MISSING`` instead of raising.
        """
        url = self.api + path
        try:
            response = self.session.request(
                method,
                url,
                params=params,
                headers={"Authorization": f"Bearer {self.settings.DRONE_TOKEN}", "Accept": "application/json"},
                timeout=TIMEOUT,
            )
        except requests.RequestException as exc:
            raise TransientInfraError(f"could not {what} on Drone at {self.base}: {type(exc).__name__}") from None
        status = response.status_code
        if status in (401, 403):
            raise ConfigError(
                "DRONE_TOKEN", f"Drone refused to {what} ({status}): the token must belong to a user with write "
                f"access to {self.settings.DRONE_REPO}"
            )  # fmt: skip
        if status == 404:
            if missing_ok:
                return MISSING
            raise ConfigError(
                "DRONE_REPO",
                f"Drone answered 404 to {method} {path}: is {self.settings.DRONE_REPO} activated in Drone?",
            )
        if status == 429 or status >= 500:
            raise TransientInfraError(f"Drone could not {what} ({status})")
        if status >= 400:
            raise PermanentInfraError(f"Drone refused to {what} ({status}): {_message(response)}")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise TransientInfraError(f"Drone answered {method} {path} with something that is not JSON") from None


def build_params(run: Run) -> dict[str, str]:
    """Return the build parameters of ``run``, refusing any value that could not pass safely."""
    try:
        return RunRequest.from_run(run).to_params()
    except CcciError as exc:
        raise CcciError(f"run {run.id} was not sent to Drone: {exc}") from None


def _harness_step(build: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Find the harness step in a build: stage ``recipe-ci``, step ``run``, by name."""
    for stage in build.get("stages") or []:
        if stage.get("name") == STAGE:
            for step in stage.get("steps") or []:
                if step.get("name") == STEP:
                    return stage, step
            return stage, None
    return None, None


def _message(response: requests.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200]
    return str(data.get("message", data))[:200] if isinstance(data, dict) else str(data)[:200]


def _read_position(files: RunFiles) -> dict[str, Any]:
    try:
        data = json.loads((files.dir / POSITION_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_position(files: RunFiles, watch: _Watch) -> None:
    # Written after the lines it covers: a crash in between repeats a few log lines, loses none.
    path = files.dir / POSITION_FILE
    tmp = path.with_suffix(".tmp")
    data = {"number": watch.number, "next_pos": watch.next_pos, "partial": watch.partial, "report": watch.report}
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
