"""The drill's checks can fail: each is fed what a broken ccci would leave, and must say so."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccci.pipeline.render import marker, render_comment, render_progress
from ccci.pipeline.report import Report
from tests.chaos import heartbeats
from tests.chaos.invariants import final_body_problems, final_status_problems, verdict
from tests.fakes.gitea import FakeComment

SHA = "a" * 40


def final(status: str, run_id: int = 7) -> str:
    return render_comment(Report(run_id, "alpha", SHA, status, 1200), marker_run_id=run_id, tested_sha=SHA)


def progress(state: str, run_id: int = 7) -> str:
    return render_progress(state, marker_run_id=run_id, recipe="alpha", tested_sha=SHA, position=1)


@pytest.mark.parametrize("status", ["passed", "failed", "error", "canceled", "timed_out"])
def test_verdict_reads_every_final_status_from_the_real_renderer(status):
    assert verdict(final(status)) == status


def test_verdict_of_progress_is_none_and_a_superseded_run_is_canceled():
    assert verdict(progress("queued")) is None and verdict(progress("running")) is None
    assert verdict(f"{marker(7)}\n⏭️ **ccci run #7 was superseded by run #9.**\n\n<details>…") == "canceled"


def comment(*bodies: str) -> FakeComment:
    return FakeComment(1001, "coop-cloud", "alpha", 1, bodies[-1], "ccci", history=list(bodies[:-1]))


def test_a_comment_edited_to_a_second_verdict_is_two_final_reports():
    assert final_body_problems(7, "passed", comment(progress("queued"), progress("running"), final("passed"))) == []
    assert final_body_problems(7, "passed", comment(final("passed"), final("passed"))) == []  # a resend
    [problem] = final_body_problems(7, "canceled", comment(progress("running"), final("passed"), final("canceled")))
    assert "changed after its final report" in problem
    [problem] = final_body_problems(7, "passed", comment(final("passed"), progress("running")))
    assert "shows progress" in problem


def status(state: str) -> dict:
    return {"state": state, "target_url": "http://ccci.chaos.test/runs/7"}


def test_two_final_statuses_or_a_pending_after_the_final_one_are_caught():
    run = {"id": 7, "sha": SHA, "state": "passed"}
    assert final_status_problems(run, [status("pending"), status("pending"), status("success")]) == []
    assert "final statuses ['success', 'success']" in final_status_problems(run, [status("success")] * 2)[0]
    assert "after its final" in final_status_problems(run, [status("success"), status("pending")])[0]
    assert final_status_problems({**run, "state": "canceled"}, [status("success")])  # the wrong verdict
    assert final_status_problems({**run, "sha": None}, [status("pending")])  # no sha, yet a status


def beats(tmp_path: Path, app: str, *lines: str) -> Path:
    apps = tmp_path / "apps"
    apps.mkdir(exist_ok=True)
    with (apps / f"{app}.log").open("a") as f:
        f.writelines(line + "\n" for line in lines)
    return apps


def test_two_runs_holding_one_app_at_once_are_an_overlap(tmp_path):
    apps = beats(tmp_path, "alpha.chaos.localhost",
                 "1 deploy n1 start 100.0", "1 work n2 end 110.0",
                 "2 deploy n3 start 111.0", "2 undeploy n4 end 120.0")  # fmt: skip
    held = heartbeats.holdings(heartbeats.read_beats(apps))
    assert heartbeats.overlaps(held, same_app=True) == []
    beats(tmp_path, "alpha.chaos.localhost", "1 undeploy n5 tick 112.5")  # run 1's teardown, late
    held = heartbeats.holdings(heartbeats.read_beats(apps))
    [(a, b)] = heartbeats.overlaps(held, same_app=True)
    assert {a.run, b.run} == {"1", "2"}


def test_runs_of_different_apps_at_once_are_concurrency_not_an_overlap(tmp_path):
    beats(tmp_path, "alpha.chaos.localhost", "1 deploy n1 start 100.0", "1 work n2 end 110.0")
    assert not heartbeats.concurrent_apps_seen(tmp_path / "apps")
    apps = beats(tmp_path, "beta.chaos.localhost", "2 deploy n3 start 105.0", "2 work n4 end 115.0")
    held = heartbeats.holdings(heartbeats.read_beats(apps))
    assert heartbeats.overlaps(held, same_app=True) == []
    assert heartbeats.concurrent_apps_seen(apps)


def test_a_work_step_executed_twice_is_caught_and_a_second_teardown_is_not(tmp_path):
    apps = beats(tmp_path, "alpha.chaos.localhost",
                 "1 work n1 start 100.0", "1 undeploy n2 start 101.0", "1 undeploy n3 start 102.0")  # fmt: skip
    assert heartbeats.steps_run_twice(heartbeats.read_beats(apps)) == []
    beats(tmp_path, "alpha.chaos.localhost", "1 work n4 start 103.0")
    [problem] = heartbeats.steps_run_twice(heartbeats.read_beats(apps))
    assert "run 1 executed step work" in problem and "2 times" in problem
