"""Real recipe runs inside Docker forks: abra in the guest, the whole Co-op Cloud lifecycle.

The test recipe (tests/data/webapp) is shaped like a Co-op Cloud recipe; its images come from
the test registry. abra in the guest is the real one when scripts/abra can build it, else the
test double tests/fakes/abra. Every run here goes through the real harness (`ccci test`, or
`ccci serve` for a webhook) with EXECUTOR=qemu, so each deploy is a real `docker stack deploy`
in a fork of the docker image's warm base. Under TCG a full lifecycle takes minutes: the suite
keeps to four runs' worth of deploys.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
import yaml

from ccci.vm.sweep import processes_using
from tests.e2e.conftest import SECRET, CcciServer, final_comment, wait_until, world_env
from tests.fakes import sign
from tests.fakes.gitea import FakeGitea
from tests.fakes.gitrepo import RecipeRepo, git, make_recipe_repo
from tests.vm.vmhelpers import REPO, abra_binary, fork_files, recipe_files, shared_vm_state

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800), pytest.mark.xdist_group("docker")]

DEFAULT_CI = REPO / "ccci" / "recipes" / "_default" / "ci.yml"
OWNER = "coop-cloud"

# Two checks after deploy that change the app differently, each in its own fork of it.
MUTATING_CHECKS = [
    {
        "name": f"check-{mark}",
        "needs": ["health"],
        "fork_from": "health",
        "timeout": 600,
        "run": (
            'stack=$(printf %s "$APP_DOMAIN" | tr . _ | cut -c1-45)\n'
            'c=$(docker ps -q --filter "label=com.docker.swarm.service.name=${stack}_app" | head -n 1)\n'
            f"docker exec \"$c\" sh -c 'echo {mark} >> /data/state; sleep 10; cat /data/state'\n"
        ),
    }
    for mark in ("A", "B")
]


def upgrade_pr(name: str = "webapp") -> dict[str, str]:
    """The changes of a good PR: a new image, page and config version (a 1.1.0+1.1 to be)."""
    files = recipe_files(name)
    return {
        "compose.yml": files["compose.yml"]
        .replace("ccci/webapp:1.0", "ccci/webapp:1.1")
        .replace("version=1.0.0+1.0", "version=1.1.0+1.1"),
        "index.html": files["index.html"].replace("1.0 is up", "1.1 is up"),
        "abra.sh": "export INDEX_VERSION=v2\n",
    }


def broken_pr(name: str = "webapp") -> dict[str, str]:
    """The changes of a bad PR: the healthcheck asks for a page the app does not have."""
    files = recipe_files(name)
    return {"compose.yml": files["compose.yml"].replace("http://127.0.0.1:8080/", "http://127.0.0.1:8080/healthz")}


def recipes_dir(tmp_path: Path, recipe: str, *, checks: list | None = None, health_timeout: int = 300) -> Path:
    """A RECIPES_DIR whose ``recipe`` runs the default pipeline, plus ``checks``."""
    ci = yaml.safe_load(DEFAULT_CI.read_text())
    ci["env"]["HEALTH_TIMEOUT"] = str(health_timeout)
    ci["steps"] += checks or []
    target = tmp_path / "recipes" / recipe
    target.mkdir(parents=True, exist_ok=True)
    (target / "ci.yml").write_text(yaml.safe_dump(ci, sort_keys=False))
    return target.parent


def released_repo(root: Path, name: str = "webapp") -> RecipeRepo:
    """The recipe's repository with its first release, 1.0.0+1.0, tagged on main."""
    repo = make_recipe_repo(root, owner=OWNER, name=name, files=recipe_files(name))
    repo.tag("1.0.0+1.0")
    return repo


def run_env(tmp_path: Path, state_dir: Path, registry: str, recipes: Path, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("CCCI_")},
        "PYTHONPATH": str(REPO),
        "CCCI_STATE_DIR": str(state_dir),
        "CCCI_LOCK_DIR": str(tmp_path / "locks"),
        "CCCI_ABRA_HOME": str(tmp_path / "abra"),
        "CCCI_EXECUTOR": "qemu",
        "CCCI_ABRA_BIN": str(abra_binary()),
        "CCCI_REGISTRY_MIRROR": registry,
        "CCCI_RECIPES_DIR": str(recipes),
        "CCCI_DOCKER_SLOTS": "2",
        **extra,
    }


def steps_of(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report["steps"]}


def no_vm_left(state_dir: Path) -> None:
    wait_until(lambda: not processes_using(state_dir), timeout=60, what="every QEMU of the run to exit")
    assert fork_files(state_dir) == []


def test_the_lifecycle_in_a_fork_release_upgrade_own_tests_and_two_checks_with_their_own_state(
    docker_cache, registry, state_dir, tmp_path
):
    """`ccci test` of a PR: release deployed, upgraded to the head, healthy, tested, torn down."""
    repo = released_repo(tmp_path / "git")
    head = repo.open_pr(1, upgrade_pr())
    checkout = tmp_path / "checkout"
    git("clone", "-q", str(repo.bare), str(checkout))
    git("checkout", "-q", "--detach", head, cwd=checkout)
    env = run_env(tmp_path, state_dir, registry, recipes_dir(tmp_path, "webapp", checks=MUTATING_CHECKS))
    done = subprocess.run([sys.executable, "-m", "ccci", "test", "webapp", "--source", str(checkout), "--json"],
                          env=env, capture_output=True, text=True, timeout=1700)  # fmt: skip
    report = json.loads(done.stdout)
    steps = steps_of(report)
    assert done.returncode == 0 and report["status"] == "passed", done.stderr[-4000:]
    assert report["mode"] == "fork" and report["sha"] == head
    [log] = (state_dir / "runs").glob("*/log")
    assert "executor: qemu, mode: fork" in log.read_text()
    # The upgrade: the latest release first, then the PR head over it.
    assert steps["secrets"]["status"] == "passed"
    assert "deploying the latest release, 1.0.0+1.0" in steps["release"]["stdout"]
    assert steps["release"]["metrics"] == {"upgrade_from_release": 1}
    assert "webapp 1.1 is up" in steps["health"]["stdout"]  # the head's page, on its domain
    assert "webapp's own tests passed" in steps["recipe-tests"]["stdout"]
    # Two forks of the healthy app, each sees only what it wrote.
    assert steps["check-A"]["stdout"].split() == ["A"] and steps["check-B"]["stdout"].split() == ["B"]
    assert steps["undeploy"]["status"] == "passed" and steps["remove"]["status"] == "passed"
    assert "removed" in steps["remove"]["stderr"] + steps["remove"]["stdout"]
    assert not list((tmp_path / "locks").glob("*.lock"))  # the app was the fork's: no lock taken
    no_vm_left(state_dir)


def test_a_cancel_during_deploy_tears_down_and_leaves_no_qemu(docker_cache, registry, state_dir, tmp_path):
    repo = make_recipe_repo(tmp_path / "git", owner=OWNER, name="webapp", files=recipe_files())
    checkout = tmp_path / "checkout"
    git("clone", "-q", str(repo.bare), str(checkout))  # no release: deploy comes right after new
    env = run_env(tmp_path, state_dir, registry, recipes_dir(tmp_path, "webapp"))
    harness = subprocess.Popen([sys.executable, "-m", "ccci", "test", "webapp", "--source", str(checkout), "--json"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    deploying = threading.Event()

    def read_progress() -> None:
        assert harness.stderr is not None
        for line in harness.stderr:
            lines.append(line)
            if line.rstrip().endswith("▶ deploy"):
                deploying.set()

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    try:
        assert deploying.wait(900), "".join(lines[-40:])
        harness.send_signal(signal.SIGTERM)
        out, _ = harness.communicate(timeout=600)
    finally:
        harness.kill()
        harness.wait()
    reader.join(10)
    report = json.loads(out)
    steps = steps_of(report)
    assert report["status"] == "canceled", "".join(lines[-40:])
    assert steps["deploy"]["status"] == "canceled" and steps["health"]["status"] == "canceled"
    assert steps["undeploy"]["status"] == "passed" and steps["remove"]["status"] == "passed"
    no_vm_left(state_dir)


class ForgeView:
    """What ``final_comment`` needs of a world: ccci's comments on one repository's PRs."""

    def __init__(self, gitea: FakeGitea, repo: str):
        self.gitea, self.repo = gitea, repo

    def ccci_comments(self, number: int) -> list:
        return [c for c in self.gitea.comments_on(OWNER, self.repo, number) if c.user == self.gitea.bot_login]


def test_through_the_webhook_two_recipes_in_parallel_forks_one_passes_one_breaks_at_health(
    docker_cache, registry, tmp_path
):
    """ccci serve + a fake forge: webapp's upgrade PR passes; notes' broken PR fails at health,
    and its comment shows the step's last lines and the service's own logs."""
    state_dir = shared_vm_state(tmp_path)  # tmp_path/state: the STATE_DIR world_env gives ccci
    recipes = recipes_dir(tmp_path, "webapp")
    recipes_dir(tmp_path, "notes", health_timeout=90)
    gitea = FakeGitea(git_root=tmp_path / "git").start()
    server = None
    try:
        heads = {}
        for name, change in (("webapp", upgrade_pr), ("notes", broken_pr)):
            heads[name] = released_repo(tmp_path / "git", name).open_pr(1, change(name))
            gitea.open_pr(OWNER, name, 1, heads[name])
        settings = run_env(tmp_path, state_dir, registry, recipes)
        env = world_env(tmp_path, gitea, **{k: v for k, v in settings.items() if k.startswith("CCCI_")})
        server = CcciServer(env, tmp_path / "ccci.log")
        server.start()
        runs = {}
        for name in heads:
            comment = gitea.post_comment(OWNER, name, 1, "!testme", user="alice")
            body = json.dumps(gitea.comment_payload(comment.id)).encode()
            answer = requests.post(server.url + "/hooks/forge", data=body, headers=sign(body, SECRET), timeout=10)
            assert answer.status_code == 202, answer.text
            runs[name] = answer.json()["run"]
        passed = final_comment(ForgeView(gitea, "webapp"), 1, "passed", timeout=1700)
        failed = final_comment(ForgeView(gitea, "notes"), 1, "failed", timeout=1700)
        reports = {}
        for name, run_id in runs.items():
            page = requests.get(f"{server.url}/runs/{run_id}", headers={"Accept": "application/json"}, timeout=10)
            reports[name] = page.json()["report"]
    finally:
        if server is not None:
            server.stop()
        gitea.close()
    ok, bad = steps_of(reports["webapp"]), steps_of(reports["notes"])
    assert reports["webapp"]["mode"] == reports["notes"]["mode"] == "fork"
    assert "Ran in a VM fork" in passed.body and "Ran in a VM fork" in failed.body
    assert "deploying the latest release, 1.0.0+1.0" in ok["release"]["stdout"]
    assert "webapp 1.1 is up" in ok["health"]["stdout"] and ok["recipe-tests"]["status"] == "passed"
    assert ok["undeploy"]["status"] == ok["remove"]["status"] == "passed"
    assert bad["deploy"]["status"] == "passed" and bad["health"]["status"] == "failed"
    assert bad["recipe-tests"]["status"] == "skipped" and bad["remove"]["status"] == "passed"
    assert "is not healthy after 90s" in bad["health"]["stdout"]
    # The comment names the failing step and shows its last lines, the services' logs among them.
    assert "health" in failed.body and "the services' own logs" in failed.body
    assert gitea.statuses[heads["notes"]][-1]["state"] == "failure"
    assert gitea.statuses[heads["webapp"]][-1]["state"] == "success"
    # Both ran at once, in forks of their own: their runs overlap in time.
    spans = {n: (r["started_at"], r["started_at"] + r["total_ms"] / 1000) for n, r in reports.items()}
    assert spans["webapp"][0] < spans["notes"][1] and spans["notes"][0] < spans["webapp"][1]
    assert not list((tmp_path / "locks").glob("*.lock"))
    no_vm_left(state_dir)
