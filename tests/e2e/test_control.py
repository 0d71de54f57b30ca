"""Runs under control, end to end: cancel, supersede, restarts after SIGKILL, a forge outage.

The recipe CI used here holds its "work" step until the test creates a release file, so a run
is reliably mid-step when it is canceled or its processes are killed. Its processes carry a
token with the run id in their command line, so the test can prove none of them survived.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import requests

from tests.e2e.conftest import final_comment, settled, wait_until

SLOW_CI = """\
timeout: 120
steps:
  - name: work
    timeout: 90
    run: |
      touch "$MARKS/started-$CCCI_RUN"
      exec python3 -c 'import os, sys, time
      while not os.path.exists(sys.argv[1]): time.sleep(0.02)
      ' "$MARKS/release" "ccci-token-$MARKS-$CCCI_RUN"
  - name: teardown
    teardown: true
    run: touch "$MARKS/teardown-$CCCI_RUN"
"""


@pytest.fixture
def slow_world(make_world, tmp_path):
    recipes = tmp_path / "recipes" / "hello"
    recipes.mkdir(parents=True)
    marks = tmp_path / "marks"
    marks.mkdir()
    marks.chmod(0o1777)  # steps run as SANDBOX_USER (nobody) when the suite runs as root
    (recipes / "ci.yml").write_text(SLOW_CI.replace("$MARKS", str(marks)))

    def make(**extra):
        world = make_world(CCCI_RECIPES_DIR=str(recipes.parent), CCCI_SANDBOX_WRITABLE=str(marks), **extra)
        world.marks = marks
        return world

    return make


def token_pids(world, run_id: int) -> list[int]:
    """Return the host pids whose command line carries the run's token (unique to this world)."""
    token = f"ccci-token-{world.marks}-{run_id}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def start_slow_run(world, number: int, user: str = "alice") -> tuple[int, str]:
    sha = world.open_pr(number)
    _, payload = world.comment(number, "!testme", user=user)
    run_id = world.deliver(payload).json()["run"]
    wait_until(lambda: (world.marks / f"started-{run_id}").exists(), what=f"run {run_id} to start")
    return run_id, sha


def assert_cleaned_up(world, run_id: int) -> None:
    assert (world.marks / f"teardown-{run_id}").exists(), "teardown did not run"
    assert token_pids(world, run_id) == [], "a process of the run survived"
    locks = world.admin("GET", "/admin/runs").json()["locks"]
    assert not any(lock["held"] for lock in locks), locks


def test_cancel_by_comment_mid_run(slow_world):
    world = slow_world()
    run_id, sha = start_slow_run(world, 20)
    assert token_pids(world, run_id)
    _, cancel = world.comment(20, "!testme cancel", user="alice")
    assert world.deliver(cancel).status_code == 202
    comment = final_comment(world, 20, "canceled")
    assert "@alice" in comment.body
    assert_cleaned_up(world, run_id)
    run = world.admin("GET", "/admin/runs").json()["runs"][0]
    assert run["state"] == "canceled" and run["canceled_by"] == "@alice"
    world.gitea.wait_for(lambda g: [s["state"] for s in g.statuses[sha]][-1] == "error")
    assert len(world.ccci_comments(20)) == 1


def test_cancel_by_someone_not_allowed_is_refused(slow_world):
    world = slow_world()
    run_id, _ = start_slow_run(world, 21)
    cancel_id, cancel = world.comment(21, "!testme cancel", user="mallory")
    world.deliver(cancel)
    world.gitea.wait_for(lambda g: ("ccci", "confused") in g.reactions.get(cancel_id, []))
    assert token_pids(world, run_id), "an outsider's cancel must not stop the run"
    (world.marks / "release").touch()
    final_comment(world, 21, "passed")


def test_cancel_by_admin_mid_run(slow_world):
    world = slow_world()
    run_id, _ = start_slow_run(world, 22)
    assert requests.post(f"{world.ccci.url}/admin/runs/{run_id}/cancel", timeout=10).status_code == 401
    assert world.admin("POST", "/admin/runs/99999/cancel").status_code == 404
    answer = world.admin("POST", f"/admin/runs/{run_id}/cancel", params={"by": "ops"})
    assert answer.status_code == 202
    comment = final_comment(world, 22, "canceled")
    assert "ops" in comment.body
    assert_cleaned_up(world, run_id)
    assert world.admin("POST", f"/admin/runs/{run_id}/cancel").status_code == 409


def test_a_new_testme_supersedes_the_running_one(slow_world):
    world = slow_world()
    first, _ = start_slow_run(world, 23)
    _, payload = world.comment(23, "!testme")
    second = world.deliver(payload).json()["run"]
    older = final_comment(world, 23, f"superseded by run #{second}")
    assert "<details>" in older.body and f"<!-- ccci:run={first} -->" in older.body
    assert_cleaned_up(world, first)
    # One run per PR at a time: the newer run started only after the older one tore down.
    wait_until(lambda: (world.marks / f"started-{second}").exists(), what="the newer run to start")
    assert (world.marks / f"started-{second}").stat().st_mtime >= (world.marks / f"teardown-{first}").stat().st_mtime
    (world.marks / "release").touch()
    # The final report's heading, not a running comment's "passed" step row: teardown may still run.
    newer = final_comment(world, 23, "passed")
    assert f"ccci:run={second}" in newer.body
    states = {r["id"]: r["state"] for r in world.admin("GET", "/admin/runs").json()["runs"]}
    assert states == {first: "canceled", second: "passed"}


def test_per_user_hourly_limit_is_a_friendly_refusal(slow_world):
    world = slow_world(CCCI_RUNS_PER_HOUR="1")
    (world.marks / "release").touch()
    sha = world.open_pr(24)
    _, payload = world.comment(24, "!testme")
    assert world.deliver(payload).status_code == 202
    world.gitea.wait_for(lambda g: "success" in [s["state"] for s in g.statuses.get(sha, [])], timeout=60)
    limited_id, payload = world.comment(24, "!testme")
    answer = world.deliver(payload)
    assert answer.json()["result"] == "limited"
    world.gitea.wait_for(lambda g: any("limit" in c.body for c in world.ccci_comments(24)))
    assert len(world.admin("GET", "/admin/runs").json()["runs"]) == 1


def _child_pids(pid: int) -> list[int]:
    """Return the children of every thread of ``pid`` (a child belongs to the thread that forked it)."""
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def _ccci_worker_pid(serve_pid: int) -> int:
    for child in _child_pids(serve_pid):
        if b"worker" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
            return child
    raise AssertionError("no ccci worker under serve")


@pytest.mark.parametrize("victim", ["worker", "server"])
def test_sigkill_mid_run_then_restart_gives_exactly_one_report_per_run(slow_world, victim):
    world = slow_world(CCCI_MAX_RUNS="1")
    running, sha = start_slow_run(world, 25)
    queued_sha = world.open_pr(26)
    _, payload = world.comment(26, "!testme")
    queued = world.deliver(payload).json()["run"]
    world.gitea.wait_for(lambda g: g.statuses.get(queued_sha))  # admitted and acknowledged

    serve_pid = world.ccci.proc.pid
    if victim == "worker":
        os.kill(_ccci_worker_pid(serve_pid), signal.SIGKILL)
    else:
        os.killpg(serve_pid, signal.SIGKILL)  # gunicorn master, its workers and the ccci worker
    # The harness learns of its parent's death (PDEATHSIG) and tears down on its own.
    wait_until(lambda: (world.marks / f"teardown-{running}").exists(), what="the orphaned run's teardown")
    wait_until(lambda: not token_pids(world, running), what="the run's processes to end")
    world.ccci.stop(signal.SIGKILL)
    (world.marks / "release").touch()
    world.ccci.start()

    interrupted = final_comment(world, 25, "canceled")
    assert "interrupted" in interrupted.body and "!testme" in interrupted.body
    final_comment(world, 26, "passed")  # the queued run resumed
    assert_cleaned_up(world, running)
    runs = {r["id"]: r for r in world.admin("GET", "/admin/runs").json()["runs"]}
    assert runs[running]["state"] == "canceled" and runs[queued]["state"] == "passed"
    # Exactly one final report each: one comment per run, one final status per sha.
    settled(world)
    assert len(world.ccci_comments(25)) == 1 and len(world.ccci_comments(26)) == 1
    for s in (sha, queued_sha):
        finals = [x["state"] for x in world.gitea.statuses[s] if x["state"] != "pending"]
        assert len(finals) == 1, finals


def test_forge_down_for_a_while_then_everything_arrives(slow_world):
    world = slow_world()
    (world.marks / "release").touch()
    sha = world.open_pr(27)
    comment_id, payload = world.comment(27, "!testme")
    world.gitea.set_down(True)
    answer = world.deliver(payload)
    assert answer.status_code == 202  # the webhook never waits on the forge
    world.gitea.wait_for(lambda g: len(g.api_calls()) >= 2)  # the worker tried, and failed
    assert not world.gitea.statuses and not world.ccci_comments(27)
    world.gitea.set_down(False)
    world.gitea.wait_for(lambda g: "success" in [s["state"] for s in g.statuses.get(sha, [])], timeout=90)
    final_comment(world, 27, "passed")
    assert ("ccci", "eyes") in world.gitea.reactions[comment_id]
    assert [s["state"] for s in world.gitea.statuses[sha]][0] == "pending"
    assert len(world.ccci_comments(27)) == 1


def test_a_second_run_of_the_same_app_waits_visibly_and_never_overlaps(slow_world):
    world = slow_world(CCCI_MAX_RUNS="2")
    first, _ = start_slow_run(world, 28)
    second_sha = world.open_pr(29)  # another PR of the same recipe: the same app domain
    _, payload = world.comment(29, "!testme")
    second = world.deliver(payload).json()["run"]
    waiting = world.gitea.wait_for(
        lambda g: next((c for c in world.ccci_comments(29) if f"held by run {first}" in c.body), None), timeout=60
    )
    assert "hello.ci.localhost" in waiting.body
    assert not (world.marks / f"started-{second}").exists()
    [lock] = world.admin("GET", "/admin/runs").json()["locks"]
    assert lock["held"] and lock["holder"]["run_id"] == str(first) and not lock["possible_leak"]
    (world.marks / "release").touch()
    world.gitea.wait_for(lambda g: "success" in [s["state"] for s in g.statuses.get(second_sha, [])], timeout=60)
    assert (world.marks / f"started-{second}").stat().st_mtime >= (world.marks / f"teardown-{first}").stat().st_mtime


def test_the_report_says_when_the_pr_head_moved_during_the_run(slow_world):
    world = slow_world()
    run_id, sha = start_slow_run(world, 30)
    newer = world.repo.push_pr(30, {"more.txt": "pushed while the run ran\n"})
    world.gitea.move_head("coop-cloud", "hello", 30, newer)
    (world.marks / "release").touch()
    comment = final_comment(world, 30, "passed")
    assert "Stale" in comment.body and newer[:10] in comment.body and sha[:10] in comment.body
    # The status belongs to the commit that was tested, not to the new head.
    world.gitea.wait_for(lambda g: [s["state"] for s in g.statuses[sha]][-1] == "success")
    assert newer not in world.gitea.statuses


def test_admin_runs_filters(slow_world):
    world = slow_world()
    (world.marks / "release").touch()
    for number in (31, 32):
        sha = world.open_pr(number)
        _, payload = world.comment(number, "!testme")
        world.deliver(payload)
        world.gitea.wait_for(lambda g, sha=sha: "success" in [s["state"] for s in g.statuses.get(sha, [])], timeout=60)
    runs = world.admin("GET", "/admin/runs", params={"pr": 32}).json()["runs"]
    assert [r["pr"] for r in runs] == [32]
    assert len(world.admin("GET", "/admin/runs", params={"state": "passed", "recipe": "hello"}).json()["runs"]) == 2
    assert world.admin("GET", "/admin/runs", params={"state": "running"}).json()["runs"] == []
    assert world.admin("GET", "/admin/runs", params={"repo": "coop-cloud/other"}).json()["runs"] == []
    bad = world.admin("GET", "/admin/runs", params={"state": "exploded"})
    assert bad.status_code == 400 and "exploded" in bad.json()["error"]
    assert requests.get(world.ccci.url + "/admin/runs", timeout=10).status_code == 401
    assert (
        'ccci_runs_finished_total{outcome="passed"} 2.0' in requests.get(world.ccci.url + "/metrics", timeout=10).text
    )


def test_a_run_that_waits_too_long_for_its_app_says_what_to_do(slow_world):
    world = slow_world(CCCI_MAX_RUNS="2", CCCI_LOCK_WAIT="1")
    first, _ = start_slow_run(world, 33)
    second_sha = world.open_pr(34)
    _, payload = world.comment(34, "!testme")
    world.deliver(payload)
    gave_up = final_comment(world, 34, "error")
    assert f"run {first}" in gave_up.body and "!testme again" in gave_up.body
    world.gitea.wait_for(lambda g: [s["state"] for s in g.statuses[second_sha]][-1] == "error")
    assert token_pids(world, first), "the holder must be left alone"
    (world.marks / "release").touch()
    final_comment(world, 33, "passed")


def test_canceling_a_queued_run_dequeues_it(slow_world):
    world = slow_world(CCCI_MAX_RUNS="1")
    running, _ = start_slow_run(world, 35)
    queued_sha = world.open_pr(36)
    _, payload = world.comment(36, "!testme")
    queued = world.deliver(payload).json()["run"]
    world.gitea.wait_for(lambda g: g.statuses.get(queued_sha))
    assert world.admin("POST", f"/admin/runs/{queued}/cancel").status_code == 202
    comment = final_comment(world, 36, "canceled")
    assert "before it started" in comment.body
    assert not (world.marks / f"started-{queued}").exists()
    assert token_pids(world, running)  # the other run goes on
    (world.marks / "release").touch()
    final_comment(world, 35, "passed")


def test_serve_restarts_a_worker_that_died(slow_world):
    world = slow_world()
    (world.marks / "release").touch()
    serve_pid = world.ccci.proc.pid
    first_worker = _ccci_worker_pid(serve_pid)
    os.kill(first_worker, signal.SIGKILL)
    wait_until(lambda: _live_worker_other_than(serve_pid, first_worker), what="a new worker")
    sha = world.open_pr(37)
    _, payload = world.comment(37, "!testme")
    world.deliver(payload)
    world.gitea.wait_for(lambda g: "success" in [s["state"] for s in g.statuses.get(sha, [])], timeout=60)


def _live_worker_other_than(serve_pid: int, old: int) -> bool:
    try:
        return _ccci_worker_pid(serve_pid) != old
    except (AssertionError, OSError):
        return False
