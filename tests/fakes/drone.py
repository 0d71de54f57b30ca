"""FakeDrone: a real HTTP server on 127.0.0.1 that answers like Drone 2.x and runs builds like its exec runner.

The API part follows docs/protocols.md §3 (``handler/api/api.go`` routes, ``core/build.go``,
``core/stage.go``, ``core/step.go`` shapes, ``core/status.go`` values)::

    POST   /api/repos/{owner}/{name}/builds?branch=…&KEY=VAL   200 Build (pending, custom), or 200 ``null``
    GET    /api/repos/{owner}/{name}/builds?page=&per_page=    200 [Build] newest first, no stages
    GET    /api/repos/{owner}/{name}/builds/{number}           200 Build + stages[] + steps[]
    GET    /api/repos/{owner}/{name}/builds/{number}/logs/{stage}/{step}   200 [{"pos","out","time"}]
    DELETE /api/repos/{owner}/{name}/builds/{number}           200 Build (killed; already finished: unchanged)

Every request needs ``Authorization: Bearer <token>`` (401 otherwise); another repository is a
404. Each build has one stage, ``recipe-ci``, with the steps ``clone`` and ``run``.

Two modes:

* scripted (default): builds stay pending until the test moves them (``set_status``,
  ``append_log``) — for unit tests of a client's state mapping;
* ``execute=True``: each build runs the ``run`` step the way drone-runner-exec does — its
  commands go through Drone's substitution of the YAML (``$${VAR}`` → ``${VAR}``, ``${VAR}`` →
  the parameter's value as text), are written to a script file with ``set -e`` and an
  ``echo + cmd`` before each command, and run as ``/bin/sh -e <script>`` with the runner's
  minimal environment (PATH and USER from the host, HOME in a per-build directory removed after
  the build), the extra ``env`` (DRONE_RUNNER_ENVIRON), the build parameters as plain variables,
  the DRONE_* variables, then the step's ``environment``. Its output becomes the step log as it
  comes; its exit code decides success or failure. A cancel SIGKILLs the step shell ONLY, not
  its process group — exactly what the exec runner does — and the log keeps collecting until
  every writer of the output pipe is gone, as Go's ``cmd.Wait`` does.

Every request is recorded as a ``Call``; ``wait_for`` waits on a Condition that every request and
every build change notifies — tests wait, they never sleep-poll.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import yaml

from .server import FakeHandler, FakeServer

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
TERMINAL = ("success", "failure", "killed", "error", "skipped", "declined")
STAGE, CLONE, STEP = "recipe-ci", "clone", "run"


@dataclass(frozen=True)
class Call:
    """One request the fake answered; ``time`` is ``time.monotonic()`` when it was recorded."""

    method: str
    path: str  # without the query string
    query: dict[str, str]
    status: int
    time: float


@dataclass
class FakeStep:
    """A step of the recipe-ci stage (``core/step.go``) and its log lines."""

    number: int
    name: str
    status: str = "pending"
    exit_code: int = 0
    started: int = 0
    stopped: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    t0: float = 0.0  # monotonic start, for the log lines' ``time``


@dataclass
class FakeBuild:
    """A build (``core/build.go``) with its one stage, and the step shell when it executes."""

    number: int
    params: dict[str, str]
    branch: str
    status: str = "pending"
    error: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    started: int = 0
    finished: int = 0
    stage_status: str = "pending"
    steps: list[FakeStep] = field(default_factory=lambda: [FakeStep(1, CLONE), FakeStep(2, STEP)])
    proc: subprocess.Popen | None = None
    thread: threading.Thread | None = None
    killed_pid: int | None = None  # the step shell the cancel SIGKILLed

    def step(self, name: str) -> FakeStep:
        """Return the step called ``name``."""
        return next(s for s in self.steps if s.name == name)


class FakeDrone(FakeServer):
    """A Drone 2.x API server (and exec runner, with ``execute=True``) for tests; a context manager."""

    def __init__(
        self,
        *,
        repo: str = "ccci/ccci",
        token: str = "fake-drone-token",
        execute: bool = False,
        commands: Sequence[str] | None = None,
        environment: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        workdir: Path | str = ROOT,
        root: Path | str | None = None,
    ):
        self.repo = repo
        self.token = token
        self.execute = execute
        if commands is None:
            commands, yml_env = drone_step()
            environment = yml_env if environment is None else environment
        self.commands = list(commands)
        self.environment = dict(environment or {})
        self.env = dict(env or {})
        self.workdir = Path(workdir)
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fake-drone-"))
        self.match = True  # False: no pipeline matches, POST answers ``null``
        self.down = False  # True: every API request answers 503
        self.fail_after_create: int | None = None  # answer this status after creating the next build
        self.builds: dict[int, FakeBuild] = {}
        super().__init__()
        self.handler, self.name = _Handler, "fake-drone"
        self._numbers = iter(range(1, 10**9))

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving, kill step shells still running, wait for their builds to end; safe twice."""
        super().close()
        with self._cond:
            builds = list(self.builds.values())
        for build in builds:
            if build.proc is not None and build.proc.poll() is None:
                build.proc.kill()
            if build.thread is not None:
                # The harness tears down on its parent's death; its end closes the log pipe.
                build.thread.join(timeout=120)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- test controls ---------------------------------------------------------------------------

    def set_down(self, down: bool) -> None:
        """Answer 503 to every API request while ``down``."""
        with self._cond:
            self.down = down
            self._cond.notify_all()

    def set_status(self, number: int, status: str, *, exit_code: int | None = None, error: str = "") -> None:
        """Move scripted build ``number`` (its stage and its ``run`` step along) to ``status``."""
        with self._cond:
            build = self.builds[number]
            now = int(time.time())
            build.status, build.error = status, error
            build.stage_status = status
            build.started = build.started or (now if status != "pending" else 0)
            clone, run = build.step(CLONE), build.step(STEP)
            if status != "pending":
                clone.status, clone.started, clone.stopped = "success", clone.started or now, clone.stopped or now
                run.status, run.started, run.t0 = status, run.started or now, run.t0 or time.monotonic()
            if status in TERMINAL:
                build.finished = run.stopped = now
                run.exit_code = exit_code if exit_code is not None else (0 if status == "success" else 1)
            self._cond.notify_all()

    def append_log(self, number: int, text: str) -> None:
        """Append ``text`` to the ``run`` step's log, one entry per line (a last partial line too)."""
        with self._cond:
            step = self.builds[number].step(STEP)
            for line in text.splitlines(keepends=True):
                self._log_line(step, line)
            self._cond.notify_all()

    # -- reading state ---------------------------------------------------------------------------

    def api_calls(self, method: str | None = None, pattern: str = "") -> list[Call]:
        """Return recorded calls, optionally only ``method`` ones whose path matches ``pattern``."""
        with self._cond:
            return [c for c in self.calls if (method is None or c.method == method) and re.search(pattern, c.path)]

    def log_text(self, number: int) -> str:
        """Return the ``run`` step's log of build ``number`` as text."""
        with self._cond:
            return "".join(e["out"] for e in self.builds[number].step(STEP).log)

    # -- the API ---------------------------------------------------------------------------------

    def _api(self, method: str, path: str, query: dict[str, str], headers: Any) -> tuple[int, Any]:
        if self.down:
            return 503, {"message": "fake drone is down"}
        auth = headers.get("Authorization", "")
        if auth.removeprefix("Bearer ") != self.token and query.get("access_token") != self.token:
            return 401, {"message": "Unauthorized"}
        m = re.fullmatch(r"/api/repos/(?P<repo>[\w.-]+/[\w.-]+)/builds(?P<rest>/.*)?", path)
        if m is None or m["repo"] != self.repo:
            return 404, {"message": "Not Found"}
        rest = m["rest"] or ""
        with self._cond:
            if rest == "" and method == "POST":
                return self._create(query)
            if rest == "" and method == "GET":
                page, per_page = int(query.get("page", 1)), int(query.get("per_page", 25))
                newest = sorted(self.builds.values(), key=lambda b: -b.number)
                return 200, [self._build_json(b) for b in newest[(page - 1) * per_page : page * per_page]]
            n = re.fullmatch(r"/(\d+)(?:/logs/(\d+)/(\d+))?", rest)
            build = self.builds.get(int(n[1])) if n else None
            if build is None:
                return 404, {"message": "Not Found"}
            if n[2] is not None and method == "GET":
                step = next((s for s in build.steps if s.number == int(n[3])), None) if n[2] == "1" else None
                if step is None or step.status == "pending":
                    return 404, {"message": "Not Found"}  # no log stored for a step that has not started
                return 200, list(step.log)
            if n[2] is None and method == "GET":
                return 200, self._build_json(build, stages=True)
            if n[2] is None and method == "DELETE":
                return self._cancel(build)
        return 404, {"message": "Not Found"}

    def _create(self, query: dict[str, str]) -> tuple[int, Any]:
        if not self.match:
            return 200, None  # trigger.go: "skipping build, no matching pipelines"
        params = {k: v for k, v in query.items() if k not in ("access_token", "commit", "branch")}
        build = FakeBuild(next(self._numbers), params, query.get("branch", "main"))
        self.builds[build.number] = build
        if self.execute:
            build.thread = threading.Thread(target=self._run_build, args=(build,), name=f"drone-{build.number}")
            build.thread.start()
        if self.fail_after_create is not None:
            status, self.fail_after_create = self.fail_after_create, None
            return status, {"message": "upstream connect error"}
        return 200, self._build_json(build)

    def _cancel(self, build: FakeBuild) -> tuple[int, Any]:
        if build.status in ("pending", "running"):  # cancel.go; finished builds come back unchanged
            build.status, build.finished = "killed", int(time.time())
            build.stage_status = "killed" if build.started else "skipped"
            for step in build.steps:
                if step.status == "running":
                    step.status, step.exit_code, step.stopped = "killed", 137, int(time.time())
                elif step.status == "pending":
                    step.status = "skipped"
            if build.proc is not None and build.proc.poll() is None:
                build.killed_pid = build.proc.pid
                build.proc.kill()  # engine/exec.go: cmd.Process.Kill() — the step's /bin/sh alone
            self._cond.notify_all()
        return 200, self._build_json(build)

    def _build_json(self, b: FakeBuild, *, stages: bool = False) -> dict[str, Any]:
        owner, name = self.repo.split("/")
        data: dict[str, Any] = {
            "id": 1000 + b.number, "repo_id": 1, "trigger": "ccci", "number": b.number, "status": b.status,
            "error": b.error, "event": "custom", "action": "", "link": f"{self.url}/{owner}/{name}/{b.number}",
            "timestamp": 0, "message": "", "before": "", "after": "", "ref": f"refs/heads/{b.branch}",
            "source_repo": "", "source": b.branch, "target": b.branch, "author_login": "ccci", "sender": "ccci",
            "params": dict(b.params), "started": b.started, "finished": b.finished, "created": b.created,
            "updated": b.finished or b.started or b.created, "version": 1,
        }  # fmt: skip
        if stages:
            data["stages"] = [
                {
                    "id": 2000 + b.number, "repo_id": 1, "build_id": 1000 + b.number, "number": 1, "name": STAGE,
                    "kind": "pipeline", "type": "exec", "status": b.stage_status, "errignore": False,
                    "exit_code": b.step(STEP).exit_code, "machine": "fake-runner", "os": "linux", "arch": "amd64",
                    "started": b.started, "stopped": b.finished, "created": b.created, "updated": b.created,
                    "version": 1, "on_success": True, "on_failure": False,
                    "steps": [
                        {
                            "id": 3000 + 10 * b.number + s.number, "step_id": 2000 + b.number, "number": s.number,
                            "name": s.name, "status": s.status, "errignore": False, "exit_code": s.exit_code,
                            "started": s.started, "stopped": s.stopped, "version": 1,
                        }
                        for s in b.steps
                    ],
                }
            ]  # fmt: skip
        return data

    # -- the exec runner -------------------------------------------------------------------------

    def _run_build(self, build: FakeBuild) -> None:
        """Run build ``build`` the way drone-runner-exec runs a one-stage exec pipeline."""
        build_root = self.root / f"build-{build.number}"
        home = build_root / "home" / "drone"
        home.mkdir(parents=True)
        owner, name = self.repo.split("/")
        system = {
            "CI": "true", "DRONE": "true", "DRONE_BUILD_NUMBER": str(build.number), "DRONE_BUILD_EVENT": "custom",
            "DRONE_REPO": self.repo, "DRONE_REPO_OWNER": owner, "DRONE_REPO_NAME": name,
            "DRONE_BRANCH": build.branch, "DRONE_STAGE_NAME": STAGE, "DRONE_STEP_NAME": STEP,
            "DRONE_WORKSPACE": str(self.workdir),
        }  # fmt: skip
        substitute = {**build.params, **system}  # runtime/runner.go: envsubst over the whole YAML
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "USER": os.environ.get("USER", "")}
        env |= self.env | build.params | system | {"HOME": str(home)}
        env |= {k: envsubst(v, substitute) for k, v in self.environment.items()}
        script = build_root / "opt" / STEP
        script.parent.mkdir(parents=True)
        script.write_text(shell_script([envsubst(c, substitute) for c in self.commands]))
        with self._cond:
            if build.status != "pending":  # canceled before a runner took it
                return
            now = int(time.time())
            build.status = build.stage_status = "running"
            build.started = now
            clone, step = build.step(CLONE), build.step(STEP)
            clone.status, clone.started, clone.stopped = "success", now, now
            step.status, step.started, step.t0 = "running", now, time.monotonic()
            build.proc = subprocess.Popen(
                ["/bin/sh", "-e", str(script)],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            self._cond.notify_all()
        proc = build.proc
        assert proc.stdout is not None
        with proc.stdout:
            # Until EOF: orphans of a killed shell still write here, and Go's cmd.Wait reads them.
            for raw in iter(proc.stdout.readline, b""):
                with self._cond:
                    self._log_line(step, raw.decode("utf-8", "replace"))
                    self._cond.notify_all()
        code = proc.wait()
        with self._cond:
            now = int(time.time())
            if build.status == "running":  # not canceled meanwhile
                verdict = "success" if code == 0 else "failure"
                build.status = build.stage_status = step.status = verdict
                step.exit_code, step.stopped, build.finished = code, now, now
            self._cond.notify_all()
        shutil.rmtree(build_root, ignore_errors=True)  # Destroy: workspace and HOME go

    def _log_line(self, step: FakeStep, line: str) -> None:
        step.log.append({"pos": len(step.log), "out": line, "time": int(time.monotonic() - (step.t0 or 0))})

    def _record(self, method: str, path: str, query: dict[str, str], status: int) -> None:
        with self._cond:
            self.calls.append(Call(method, path, query, status, time.monotonic()))
            self._cond.notify_all()


def drone_step(
    path: Path | str = ROOT / ".drone.yml", pipeline: str = STAGE, step: str = STEP
) -> tuple[list[str], dict[str, str]]:
    """Return the commands and plain environment of ``step`` of ``pipeline`` in a .drone.yml."""
    for doc in yaml.safe_load_all(Path(path).read_text()):
        if isinstance(doc, dict) and doc.get("kind") == "pipeline" and doc.get("name") == pipeline:
            for s in doc.get("steps") or []:
                if s.get("name") == step:
                    env = {k: str(v) for k, v in (s.get("environment") or {}).items() if not isinstance(v, dict)}
                    return [str(c) for c in s.get("commands") or []], env
    raise LookupError(f"{path}: no step {step!r} in pipeline {pipeline!r}")


def envsubst(text: str, values: Mapping[str, str]) -> str:
    """Substitute like Drone does over .drone.yml: ``$$`` → ``$``, ``${NAME}``/``$NAME`` → value (unset: empty)."""

    def one(m: re.Match) -> str:
        if m[0] == "$$":
            return "$"
        return values.get(m[1] or m[2], "")

    return re.sub(r"\$\$|\$\{(\w+)\}|\$(\w+)", one, text)


def shell_script(commands: Sequence[str]) -> str:
    """Return the step script runner-go writes: ``set -e``, then each command echoed before it runs."""
    lines = ["", "set -e", ""]
    for command in commands:
        lines += [f"echo + {shlex.quote(command)}", command, ""]
    return "\n".join(lines)


class _Handler(FakeHandler):
    """Route one request to the fake's API."""

    server_version = "FakeDrone/2.0"

    def _handle(self) -> None:
        fake: FakeDrone = self.server.fake  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        status, payload = fake._api(self.command, split.path, query, self.headers)
        fake._record(self.command, split.path, query, status)
        data = json.dumps(payload).encode()  # None → ``null``, as Drone writes it
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
