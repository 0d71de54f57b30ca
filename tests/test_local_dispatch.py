"""The local dispatcher's start handshake, with a real worker process that dies at the worst moment.

A stand-in worker (a child Python process) starts a real harness through ``LocalDispatcher`` and
SIGKILLs itself inside the ``record`` callback, or right after it, before the harness is let
through its gate. Either way the harness must never run a step, write a report or touch the
run's directory — the next worker will start the run again from the store — and it must not
outlive its worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakes.gitea import FakeGitea
from tests.fakes.gitrepo import make_recipe_repo
from tests.support import ROOT

WORKER = """
import json, os, signal, sys
from ccci.config import load_settings
from ccci.dispatch.local import LocalDispatcher
from ccci.store import Run

spec = json.loads(sys.argv[1])
settings = load_settings()
run = Run(id=5, state="running", owner="coop-cloud", repo="hello", pr=3, recipe="hello", requester="alice",
          comment_id=1, clone_url=spec["clone_url"], sha=spec["sha"], authorized=1, admitted=1,
          status_comment=None, worker_pid=None, dispatch_ref=None, cancel_requested=0, canceled_by=None,
          superseded_by=None, note="", report=None, created_at=0.0, started_at=None, finished_at=None)

def record(ref):
    # Die before the store knows the harness ("recording"), or just after ("after recording");
    # either way before the gate is opened.
    if spec["die"] == "recording":
        open(spec["refs"] + ".seen", "w").write(ref)
        os.kill(os.getpid(), signal.SIGKILL)
    open(spec["refs"], "w").write(ref)
    if spec["die"] == "after recording":
        os.kill(os.getpid(), signal.SIGKILL)

dispatcher = LocalDispatcher(settings)
dispatcher.start(run, record)
finished = []
while dispatcher.active():
    finished += dispatcher.poll()
    import time; time.sleep(0.05)
done = finished + dispatcher.poll()
print(json.dumps([{**f.__dict__, "report": f.report.to_dict() if f.report else None} for f in done]))
"""


@pytest.fixture
def world(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    marks.chmod(0o1777)
    recipes = tmp_path / "recipes" / "hello"
    recipes.mkdir(parents=True)
    (recipes / "ci.yml").write_text(f"steps:\n  - name: step\n    run: touch {marks}/ran-$CCCI_RUN\n")
    with FakeGitea(git_root=tmp_path / "git") as gitea:
        repo = make_recipe_repo(tmp_path / "git", owner="coop-cloud", name="hello", files={"README.md": "x\n"})
        sha = repo.open_pr(3, {"pr.txt": "change\n"})
        gitea.open_pr("coop-cloud", "hello", 3, sha)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CCCI_")}
        env.update({
            "PYTHONPATH": str(ROOT), "CCCI_STATE_DIR": str(tmp_path / "state"),
            "CCCI_LOCK_DIR": str(tmp_path / "locks"), "CCCI_ABRA_HOME": str(tmp_path / "abra"),
            "CCCI_RECIPES_DIR": str(recipes.parent), "CCCI_EXECUTOR": "bwrap",
            "CCCI_SANDBOX_WRITABLE": str(marks), "CCCI_FORGE_URL": gitea.url,
        })  # fmt: skip
        yield {"env": env, "marks": marks, "tmp": tmp_path, "clone_url": gitea.clone_url("coop-cloud", "hello"),
               "sha": sha}  # fmt: skip


def start_worker(world, die: str) -> subprocess.CompletedProcess:
    spec = {"clone_url": world["clone_url"], "sha": world["sha"], "refs": str(world["tmp"] / "ref"), "die": die}
    return subprocess.run([sys.executable, "-c", WORKER, json.dumps(spec)], env=world["env"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def harness_gone(ref: str, within: float = 30) -> bool:
    pid = int(ref.split(":")[0])
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)  # the harness' exit has no event this test process could wait on
    return False


@pytest.mark.parametrize("die", ["recording", "after recording"])
def test_a_worker_that_dies_before_opening_the_gate_leaves_a_harness_that_does_nothing(world, die):
    done = start_worker(world, die)
    assert done.returncode == -9, done.stderr
    ref = (world["tmp"] / ("ref" if die == "after recording" else "ref.seen")).read_text()
    assert harness_gone(ref), "the harness outlived its worker"
    run_dir = world["tmp"] / "state" / "runs" / "5"
    assert not (world["marks"] / "ran-5").exists()  # no step ran
    assert not (run_dir / "report.json").exists() and not (run_dir / "began").exists()
    assert not (run_dir / "log").exists()  # it never passed the gate: nothing of the run was touched
    assert not list((world["tmp"] / "locks").glob("*.lock"))


def test_a_worker_that_opens_the_gate_gets_its_run_executed_once(world):
    done = start_worker(world, "never")
    assert done.returncode == 0, done.stderr
    [finished] = json.loads(done.stdout.splitlines()[-1])
    assert finished["report"]["status"] == "passed", finished
    assert (world["marks"] / "ran-5").exists()
    assert (world["tmp"] / "ref").read_text().split(":")[1].isdigit()  # pid and start time
