"""DroneDispatcher against FakeDrone (scripted builds): trigger, validation, errors, state mapping, logs, adopt."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ccci.config import load_settings
from ccci.dispatch.drone import DroneDispatcher
from ccci.errors import CcciError, ConfigError, TransientInfraError
from ccci.harness.runfiles import RunFiles
from ccci.harness.wire import EVENT_PREFIX, REPORT_PREFIX
from ccci.pipeline.report import Report
from ccci.store import Run
from tests.fakes.drone import FakeDrone

SHA = "0123456789abcdef0123456789abcdef01234567"
CLONE = "https://git.coopcloud.tech/coop-cloud/custom-html.git"


def make_run(run_id: int = 7, **changes) -> Run:
    fields = dict(
        id=run_id, state="running", owner="coop-cloud", repo="custom-html", pr=12, recipe="custom-html",
        requester="alice", comment_id=5, clone_url=CLONE, sha=SHA, authorized=1, admitted=1, status_comment=None,
        worker_pid=None, dispatch_ref=None, cancel_requested=0, canceled_by=None, superseded_by=None, note="",
        report=None, created_at=0.0, started_at=None, finished_at=None,
    )  # fmt: skip
    fields.update(changes)
    return Run(**fields)


def report_of(run_id: int, status: str = "passed") -> dict:
    return {"run": run_id, "recipe": "custom-html", "sha": SHA, "status": status, "passed": status == "passed",
            "total_ms": 5, "steps": []}  # fmt: skip


@pytest.fixture
def drone():
    with FakeDrone() as fake:
        yield fake


@pytest.fixture
def settings(tmp_path: Path, drone: FakeDrone):
    return load_settings(
        environ={}, STATE_DIR=tmp_path / "state", DISPATCH="drone", DRONE_URL=drone.url,
        DRONE_TOKEN=drone.token, DRONE_REPO=drone.repo,
    )  # fmt: skip


@pytest.fixture
def dispatcher(settings):
    with DroneDispatcher(settings, poll_interval=0.1) as d:
        yield d


# -- start -------------------------------------------------------------------------------------


def test_start_triggers_one_custom_build_with_every_parameter(drone, settings):
    with DroneDispatcher(settings, branch="main") as dispatcher:
        ref = dispatcher.start(make_run(7))
    assert ref == "1" and dispatcher.active() == {7}
    [post] = drone.api_calls("POST")
    assert post.path == "/api/repos/ccci/ccci/builds" and post.status == 200
    assert post.query == {
        "branch": "main", "CCCI_RUN": "7", "CCCI_RECIPE": "custom-html", "CCCI_CLONE_URL": CLONE,
        "CCCI_PR": "12", "CCCI_SHA": SHA,
    }  # fmt: skip
    build = drone.builds[1]
    assert build.params["CCCI_CLONE_URL"] == CLONE and build.status == "pending"


def test_start_without_a_branch_lets_drone_pick_the_default(drone, dispatcher):
    dispatcher.start(make_run(8))
    [post] = drone.api_calls("POST")
    assert "branch" not in post.query and post.query["CCCI_RUN"] == "8"


BAD = [
    ("recipe", "Custom-HTML"),
    ("recipe", "../etc"),
    ("recipe", "a;rm -rf /"),
    ("recipe", ""),
    ("recipe", "x" * 65),
    ("sha", "0123456"),
    ("sha", SHA.upper()),
    ("sha", SHA + "\n"),
    ("sha", None),
    ("pr", 0),
    ("pr", -3),
    ("pr", True),
    ("id", 0),
    ("clone_url", "ftp://git.example/x.git"),
    ("clone_url", "file:///etc/passwd"),
    ("clone_url", "https://git.example/x y.git"),
    ("clone_url", "https://git.example/x.git;id"),
    ("clone_url", "https://git.example/$(id).git"),
    ("clone_url", "https://git.example/`id`.git"),
    ("clone_url", "https://git.example/x'.git"),
    ("clone_url", 'https://git.example/x".git'),
    ("clone_url", "https://user:secret@git.example/x.git"),
    ("clone_url", "https:///x.git"),
    ("clone_url", ""),
]


@pytest.mark.parametrize(("key", "value"), BAD)
def test_a_bad_parameter_is_refused_and_nothing_is_sent(drone, dispatcher, key, value):
    with pytest.raises(CcciError, match="was not sent to Drone") as caught:
        dispatcher.start(make_run(**{key: value}))
    assert not isinstance(caught.value, TransientInfraError)  # retrying cannot help
    assert drone.calls == [] and dispatcher.active() == set()


def test_no_matching_pipeline_is_a_configuration_error(drone, dispatcher):
    drone.match = False
    with pytest.raises(ConfigError, match="matched no pipeline") as caught:
        dispatcher.start(make_run())
    assert caught.value.key == "DRONE_REPO" and "ccci/ccci" in str(caught.value) and "event custom" in str(caught.value)
    assert dispatcher.active() == set()


def test_a_refused_token_is_a_configuration_error_that_does_not_show_the_token(drone, settings, caplog):
    bad = settings.replace(DRONE_TOKEN="wrong-secret-token-1234")
    with DroneDispatcher(bad) as dispatcher, pytest.raises(ConfigError) as caught:
        dispatcher.start(make_run())
    assert caught.value.key == "DRONE_TOKEN" and "401" in str(caught.value)
    assert "wrong-secret-token-1234" not in str(caught.value) + caplog.text
    assert drone.builds == {}


def test_an_unknown_repository_is_a_configuration_error_naming_it(drone, settings):
    with DroneDispatcher(settings.replace(DRONE_REPO="ccci/nope")) as dispatcher, pytest.raises(ConfigError) as caught:
        dispatcher.start(make_run())
    assert caught.value.key == "DRONE_REPO" and "ccci/nope" in str(caught.value)


def test_drone_down_at_start_is_transient(drone, dispatcher):
    drone.set_down(True)
    with pytest.raises(TransientInfraError):
        dispatcher.start(make_run())
    assert drone.builds == {} and dispatcher.active() == set()


def test_drone_unreachable_at_start_is_transient(settings):
    unreachable = settings.replace(DRONE_URL="http://127.0.0.1:9")
    with DroneDispatcher(unreachable) as dispatcher, pytest.raises(TransientInfraError, match="could not"):
        dispatcher.start(make_run())


def test_a_retried_start_finds_the_build_an_answer_was_lost_for(drone, dispatcher):
    drone.fail_after_create = 502  # the build is made, the answer is an error
    with pytest.raises(TransientInfraError):
        dispatcher.start(make_run(9))
    assert dispatcher.start(make_run(9)) == "1"
    assert len(drone.api_calls("POST")) == 1 and list(drone.builds) == [1]


# -- poll: state, log, report ------------------------------------------------------------------


@pytest.mark.parametrize(("status", "verdict"), [("success", "passed"), ("failure", "failed"), ("killed", "canceled")])
def test_a_build_moves_pending_running_terminal_and_finishes_once_with_its_report(
    drone, dispatcher, settings, status, verdict
):
    run = make_run(7)
    dispatcher.start(run)
    assert dispatcher.poll() == []
    assert drone.api_calls("GET", "/logs/") == []  # nothing to read while the step is pending

    drone.set_status(1, "running")
    started = {"kind": "started", "step": "deploy"}
    drone.append_log(1, f"+ .venv/bin/python -m ccci run\n[deploy] deploying\n{EVENT_PREFIX}{json.dumps(started)}\n")
    assert dispatcher.poll() == []
    assert dispatcher.progress(run) == [started]
    files = RunFiles(settings.runs_dir, 7)
    assert files.log.read_text() == "+ .venv/bin/python -m ccci run\n[deploy] deploying\n"

    drone.append_log(1, f"[deploy] done\n{REPORT_PREFIX}{json.dumps(report_of(7, verdict))}\n")
    drone.set_status(1, status)
    [finished] = dispatcher.poll()
    assert finished.run_id == 7 and finished.report == Report.from_dict(report_of(7, verdict))
    assert files.log.read_text().endswith("[deploy] deploying\n[deploy] done\n")
    assert files.read_report() == report_of(7, verdict)
    assert dispatcher.poll() == [] and dispatcher.active() == set()


@pytest.mark.parametrize("status", ["failure", "error", "killed", "skipped", "declined"])
def test_a_build_that_ends_without_a_report_finishes_with_the_reason_and_link(drone, dispatcher, status):
    dispatcher.start(make_run(3))
    drone.set_status(1, "running")
    drone.append_log(1, "+ ./scripts/install\ninstall failed\n")
    drone.set_status(1, status, error="exec: boom" if status == "error" else "")
    [finished] = dispatcher.poll()
    assert finished.report is None
    assert f"ended {status} without a report" in finished.reason
    assert f"{drone.url}/ccci/ccci/1" in finished.reason
    if status == "error":
        assert "exec: boom" in finished.reason


def test_the_last_report_line_wins_and_split_lines_are_joined(drone, dispatcher, settings):
    run = make_run(4)
    dispatcher.start(run)
    drone.set_status(1, "running")
    event = {"kind": "finished", "step": "smoke", "status": "passed"}
    line = EVENT_PREFIX + json.dumps(event)
    drone.append_log(1, line[:10])  # the runner flushed half a line
    assert dispatcher.poll() == [] and dispatcher.progress(run) == []
    drone.append_log(1, line[10:] + "\n")
    assert dispatcher.poll() == [] and dispatcher.progress(run) == [event]
    drone.append_log(1, f"{REPORT_PREFIX}{json.dumps(report_of(4, 'failed'))}\n")
    drone.append_log(1, f"{REPORT_PREFIX}{json.dumps(report_of(4, 'canceled'))}")  # last, unterminated
    drone.set_status(1, "killed")
    [finished] = dispatcher.poll()
    assert finished.report == Report.from_dict(report_of(4, "canceled"))
    assert (
        not RunFiles(settings.runs_dir, 4).log.exists()
        or "::ccci" not in RunFiles(settings.runs_dir, 4).log.read_text()
    )


def test_drone_down_during_a_poll_finishes_nothing_and_the_next_poll_recovers(drone, dispatcher, caplog):
    dispatcher.start(make_run(5))
    drone.set_status(1, "running")
    drone.append_log(1, f"{REPORT_PREFIX}{json.dumps(report_of(5))}\n")
    drone.set_status(1, "success")
    drone.set_down(True)
    with caplog.at_level(logging.WARNING):
        assert dispatcher.poll() == []
    assert dispatcher.active() == {5} and "503" in caplog.text and drone.token not in caplog.text
    drone.set_down(False)
    [finished] = dispatcher.poll()
    assert finished.report == Report.from_dict(report_of(5))


def test_a_build_that_vanished_finishes_with_a_reason(drone, dispatcher):
    dispatcher.start(make_run(6))
    with drone._cond:
        del drone.builds[1]
    [finished] = dispatcher.poll()
    assert finished.report is None and "no longer exists" in finished.reason


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_sends_delete_and_the_killed_build_is_collected(drone, dispatcher):
    run = make_run(7)
    dispatcher.start(run)
    drone.set_status(1, "running")
    assert dispatcher.cancel(run) is True
    [delete] = drone.api_calls("DELETE")
    assert delete.path == "/api/repos/ccci/ccci/builds/1" and delete.status == 200
    assert drone.builds[1].status == "killed"
    [finished] = dispatcher.poll()
    assert finished.report is None and "ended killed" in finished.reason


def test_cancel_of_a_run_not_watched_is_false_and_sends_nothing(drone, dispatcher):
    assert dispatcher.cancel(make_run(99)) is False
    assert drone.calls == []


def test_a_cancel_drone_did_not_take_is_sent_again_on_the_next_poll(drone, dispatcher):
    run = make_run(7)
    dispatcher.start(run)
    drone.set_status(1, "running")
    drone.set_down(True)
    assert dispatcher.cancel(run) is True
    assert drone.builds[1].status == "running"
    drone.set_down(False)
    dispatcher.poll()
    assert [c.status for c in drone.api_calls("DELETE")] == [503, 200]
    assert drone.builds[1].status == "killed"


# -- adopt -------------------------------------------------------------------------------------


def test_a_restarted_worker_adopts_the_build_and_reads_its_log_onward(drone, settings):
    run = make_run(11)
    with DroneDispatcher(settings) as before:
        ref = before.start(run)
        drone.set_status(1, "running")
        drone.append_log(1, "line one\nline two\n")
        assert before.poll() == []
    drone.append_log(1, f"line three\n{REPORT_PREFIX}{json.dumps(report_of(11))}\n")
    drone.set_status(1, "success")
    with DroneDispatcher(settings) as after:
        after.adopt(make_run(11, dispatch_ref=ref))
        assert after.active() == {11}
        [finished] = after.poll()
    assert finished.report == Report.from_dict(report_of(11))
    assert RunFiles(settings.runs_dir, 11).log.read_text() == "line one\nline two\nline three\n"


def test_adopting_a_run_without_a_build_number_finishes_it_with_a_reason(drone, dispatcher):
    dispatcher.adopt(make_run(12, dispatch_ref="not-a-number"))
    assert dispatcher.cancel(make_run(12)) is False
    [finished] = dispatcher.poll()
    assert finished.report is None and "no Drone build number" in finished.reason
    assert drone.calls == []
