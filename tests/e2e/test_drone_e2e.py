"""End to end on Drone: DroneDispatcher → FakeDrone executing .drone.yml's recipe-ci command → the real harness.

The "runner host" is this machine with its own state directory and config file (what
/etc/ccci/config.toml is on a real runner); the dispatcher's side has another, as ccci's server
and a Drone runner do not share a disk. The recipe comes from FakeGitea over git smart HTTP.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import requests

from ccci.config import load_settings
from ccci.dispatch.drone import DroneDispatcher
from ccci.harness.runfiles import RunFiles
from ccci.store import Run
from tests.fakes.drone import TERMINAL, FakeDrone, drone_step
from tests.fakes.gitea import FakeGitea
from tests.fakes.gitrepo import make_recipe_repo

ROOT = Path(__file__).resolve().parents[2]
OWNER, REPO = "coop-cloud", "hello"


INSTALL_ROOT = "/opt/ccci"  # where a runner host has ccci installed (deploy/README.md)


def harness_command() -> list[str]:
    """Return .drone.yml's recipe-ci step, running this checkout's ccci where a runner has its installed one."""
    commands, _ = drone_step(ROOT / ".drone.yml")
    [run] = commands  # the step only runs the harness: ccci is installed on the runner host
    assert run.startswith(f"{INSTALL_ROOT}/.venv/bin/ccci run ")
    assert "$${CCCI_RUN}" in run  # escaped, so Drone does not paste parameters into the script
    return [run.replace(INSTALL_ROOT, str(ROOT), 1)]


def runner_config(tmp: Path, gitea: FakeGitea, **extra: str) -> Path:
    """Write the runner's ccci config file (TOML) and return its path."""
    values = {
        "STATE_DIR": str(tmp / "runner-state"),
        "LOCK_DIR": str(tmp / "locks"),
        "ABRA_HOME": str(tmp / "abra"),
        "FORGE_URL": gitea.url,
        "FORGE_TOKEN": gitea.token,
        "EXECUTOR": "bwrap",
        **extra,
    }
    path = tmp / "runner.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def make_run(run_id: int, pr: int, sha: str, clone_url: str, build: str | None = None) -> Run:
    return Run(
        id=run_id, state="running", owner=OWNER, repo=REPO, pr=pr, recipe="hello", requester="alice",
        comment_id=1, clone_url=clone_url, sha=sha, authorized=1, admitted=1, status_comment=None, worker_pid=None,
        dispatch_ref=build, cancel_requested=0, canceled_by=None, superseded_by=None, note="", report=None,
        created_at=0.0, started_at=None, finished_at=None,
    )  # fmt: skip


def processes_with(needle: str) -> list[int]:
    """Return the pids of live processes whose command line contains ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next(x for x in (entry / "status").read_text().splitlines() if x.startswith("State:"))
            except (OSError, StopIteration):
                continue
            if needle in cmdline and "Z" not in state:
                found.append(int(entry.name))
    return found


@pytest.fixture
def gitea(tmp_path: Path):
    with FakeGitea(git_root=tmp_path / "git") as fake:
        yield fake


def test_a_drone_build_runs_the_real_harness_and_reports_passed(tmp_path, gitea):
    repo = make_recipe_repo(tmp_path / "git", owner=OWNER, name=REPO, files={"README.md": "hello recipe\n"})
    sha = repo.open_pr(7, {"pr-7.txt": "change\n"})
    gitea.open_pr(OWNER, REPO, 7, sha)
    config = runner_config(tmp_path, gitea)
    with FakeDrone(execute=True, commands=harness_command(), environment={"CCCI_CONFIG": str(config)}) as drone:
        settings = load_settings(
            environ={}, STATE_DIR=tmp_path / "ccci-state", DISPATCH="drone", DRONE_URL=drone.url,
            DRONE_TOKEN=drone.token, DRONE_REPO=drone.repo,
        )  # fmt: skip
        run = make_run(41, 7, sha, gitea.clone_url(OWNER, REPO))
        with DroneDispatcher(settings) as dispatcher:
            assert dispatcher.start(run) == "1"
            drone.wait_for(lambda d: d.builds[1].status in TERMINAL, timeout=120)
            [finished] = dispatcher.poll()
            progress = dispatcher.progress(run)
        build = drone.builds[1]
    assert build.status == "success", drone.log_text(1)[-3000:]
    report = finished.report
    assert report is not None and report.status == "passed" and report.sha == sha and str(report.run) == "41"
    assert [s.name for s in report.steps] == ["deploy", "checkout", "config", "metrics", "teardown"]
    assert any(e.get("step") == "deploy" for e in progress)
    log = RunFiles(settings.runs_dir, 41).log.read_text()
    assert "[deploy] deployed hello" in log and f"HEAD is {sha}" in log
    assert "::ccci-" not in log
    assert not processes_with("--run-id 41 ")


def test_canceling_a_drone_build_kills_the_step_shell_and_the_harness_still_tears_down(tmp_path, gitea):
    repo = make_recipe_repo(tmp_path / "git", owner=OWNER, name=REPO, files={"README.md": "hello recipe\n"})
    sha = repo.open_pr(8, {"pr-8.txt": "change\n"})
    gitea.open_pr(OWNER, REPO, 8, sha)
    # The process sandbox gives steps a fresh /tmp; the shared abra servers/ is one of the few
    # paths they may write (as SANDBOX_USER, nobody, when the suite runs as root).
    (tmp_path / "abra" / "servers").mkdir(parents=True)
    (tmp_path / "abra" / "servers").chmod(0o1777)
    marker = tmp_path / "abra" / "servers" / "teardown-ran"
    naptime = f"300.{secrets.randbelow(10**6):06d}"  # a sleep no other process on this host has
    recipes = tmp_path / "recipes"
    (recipes / "hello").mkdir(parents=True)
    (recipes / "hello" / "ci.yml").write_text(
        "timeout: 600\n"
        "steps:\n"
        "  - name: wait\n"
        f"    run: echo waiting; sleep {naptime}\n"
        "  - name: teardown\n"
        "    teardown: true\n"
        f"    run: touch {marker}\n"
    )
    config = runner_config(tmp_path, gitea)
    with FakeDrone(
        execute=True,
        commands=harness_command(),
        environment={"CCCI_CONFIG": str(config)},
        env={"CCCI_RECIPES_DIR": str(recipes)},  # the runner's own environment (DRONE_RUNNER_ENVIRON)
    ) as drone:
        settings = load_settings(
            environ={}, STATE_DIR=tmp_path / "ccci-state", DISPATCH="drone", DRONE_URL=drone.url,
            DRONE_TOKEN=drone.token, DRONE_REPO=drone.repo,
        )  # fmt: skip
        run = make_run(42, 8, sha, gitea.clone_url(OWNER, REPO))
        with DroneDispatcher(settings) as dispatcher:
            dispatcher.start(run)
            drone.wait_for(lambda d: "[wait] waiting" in d.log_text(1), timeout=120)
            assert dispatcher.poll() == []
            assert processes_with(f"sleep {naptime}")
            shell = drone.builds[1].proc
            assert dispatcher.cancel(run) is True
            assert drone.builds[1].killed_pid == shell.pid and drone.builds[1].status == "killed"
            # The log pipe closes when the last writer — the harness, after its teardown — is gone.
            drone.builds[1].thread.join(timeout=120)
            assert not drone.builds[1].thread.is_alive()
            [finished] = dispatcher.poll()
    assert shell.returncode == -9  # SIGKILL, to the shell alone
    report = finished.report
    assert report is not None and report.status == "canceled", drone.log_text(1)[-3000:]
    assert marker.exists()
    teardown = next(s for s in report.steps if s.name == "teardown")
    assert teardown.status == "passed"
    assert not processes_with(f"sleep {naptime}") and not processes_with("--run-id 42 ")
    assert not (tmp_path / "runner-state" / "runs" / "42" / "abra").exists()  # the run's ABRA_DIR is gone
    assert list((tmp_path / "locks").glob("*")) == []  # the app lock was released


def test_testme_through_gunicorn_and_the_worker_on_drone(make_world, tmp_path):
    """The whole path with DISPATCH=drone: webhook → worker → Drone build → harness → report comment."""
    with FakeDrone(execute=True, commands=harness_command()) as drone:
        world = make_world(
            CCCI_DISPATCH="drone", CCCI_DRONE_URL=drone.url, CCCI_DRONE_TOKEN=drone.token, CCCI_DRONE_REPO=drone.repo
        )
        # The runner host has its own config (its own state); it reaches the same fake forge.
        drone.environment["CCCI_CONFIG"] = str(runner_config(tmp_path, world.gitea))
        sha = world.open_pr(7)
        comment_id, payload = world.comment(7, "!testme")
        run_id = world.deliver(payload).json()["run"]
        world.gitea.wait_for(lambda g: "success" in [s["state"] for s in g.statuses.get(sha, [])], timeout=120)
        [call] = drone.api_calls("POST")
        assert call.query["CCCI_RUN"] == str(run_id) and call.query["CCCI_SHA"] == sha
        [comment] = world.ccci_comments(7)
        assert "passed" in comment.body and f"ccci:run={run_id}" in comment.body
        log = requests.get(f"{world.ccci.url}/runs/{run_id}/log", timeout=10).text
        assert "[deploy] deployed hello" in log  # the Drone step's log, mirrored for the run page
