"""The scheduler with real processes: timeouts, cancel, a real signal, redaction, teardown."""

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

from pipeline_helpers import alive, read_pid, wait_for

from ccci.errors import PermanentInfraError
from ccci.pipeline.executor import TIMEOUT_EXIT
from ccci.pipeline.scheduler import run_pipeline
from ccci.pipeline.spec import load_pipeline
from ccci.pipeline.stop import Stop
from ccci.vm.bwrap import BwrapExecutor

ENV = {"RECIPE": "demo", "CCCI_RUN": "41", "CCCI_SHA": "f" * 40}
SLOW = "sh -c 'sleep 300 & echo $! > {pid}; wait'"  # the child must die with the step


def pipeline(tmp_path, text):
    path = tmp_path / "ci.yml"
    path.write_text(text)
    return load_pipeline(path)


def run(tmp_path, text, **kw):
    executor = BwrapExecutor(use_bwrap=False, grace=0.5)
    return run_pipeline(pipeline(tmp_path, text), executor, tmp_path, dict(ENV), **kw)


def statuses(report):
    return {s.name: s.status for s in report.steps}


def test_step_timeout_kills_children_skips_dependents_and_runs_teardown(tmp_path):
    report = run(
        tmp_path,
        f"""
steps:
  - {{name: slow, run: "{SLOW.format(pid="slow.pid")}", timeout: 0.5}}
  - {{name: after, needs: [slow], run: "true"}}
  - {{name: after2, needs: [after], run: "true"}}
  - {{name: other, run: "echo ::metric n=3"}}
  - {{name: down, teardown: true, run: "echo bye > down.txt"}}
""",
    )
    assert statuses(report) == {
        "slow": "timed_out", "after": "skipped", "after2": "skipped", "other": "passed", "down": "passed",
    }  # fmt: skip
    assert report.steps[0].exit_code == TIMEOUT_EXIT and report.status == "timed_out"
    assert report.steps[3].metrics == {"n": 3} and (tmp_path / "down.txt").exists()
    child = read_pid(tmp_path / "slow.pid")
    wait_for(lambda: not alive(child), what="the timed-out step's child to die")
    assert (report.run, report.recipe, report.sha) == ("41", "demo", "f" * 40)


def test_pipeline_timeout_stops_in_flight_steps_and_cancels_the_rest(tmp_path):
    report = run(
        tmp_path,
        f"""
timeout: 1
steps:
  - {{name: slow, run: "{SLOW.format(pid="slow.pid")}"}}
  - {{name: later, needs: [slow], run: "true"}}
  - {{name: down, teardown: true, run: "echo $CCCI_STEP > down.txt"}}
""",
    )
    assert statuses(report) == {"slow": "canceled", "later": "canceled", "down": "passed"}
    assert report.status == "timed_out" and (tmp_path / "down.txt").read_text() == "down\n"
    wait_for(lambda: not alive(read_pid(tmp_path / "slow.pid")), what="the child to die")


def test_a_stop_request_stops_the_run_and_teardown_still_runs(tmp_path):
    stop = Stop()
    pidfile = tmp_path / "slow.pid"

    def canceller():
        wait_for(lambda: read_pid(pidfile), what="the slow step's child")
        stop.request("canceled", "asked to in the test")

    helper = threading.Thread(target=canceller)
    helper.start()
    report = run(
        tmp_path,
        f"""
steps:
  - {{name: slow, run: "{SLOW.format(pid="slow.pid")}"}}
  - {{name: later, needs: [slow], run: "true"}}
  - {{name: down, teardown: true, run: "true"}}
""",
        stop=stop,
    )
    helper.join()
    assert statuses(report) == {"slow": "canceled", "later": "canceled", "down": "passed"}
    assert report.status == "canceled"
    wait_for(lambda: not alive(read_pid(pidfile)), what="the child to die")


def test_a_real_signal_sets_the_stop_switch_and_becomes_a_canceled_report(tmp_path):
    stop = Stop()

    def on_signal(signum, frame):  # what the harness' guard does: record, never raise
        stop.request("canceled", "SIGUSR1 in test")

    pidfile = tmp_path / "slow.pid"
    fast_done = threading.Event()

    def signaller():
        wait_for(lambda: read_pid(pidfile), what="the slow step's child")
        fast_done.wait(30)  # "fast" has finished: the signal must find only "slow" running
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to, and handled in, the main thread

    def on_event(event):
        if event.kind == "finished" and event.step == "fast":
            fast_done.set()

    previous = signal.signal(signal.SIGUSR1, on_signal)
    helper = threading.Thread(target=signaller)
    try:
        helper.start()
        report = run(
            tmp_path,
            f"""
steps:
  - {{name: slow, run: "{SLOW.format(pid="slow.pid")}"}}
  - {{name: fast, run: "true"}}
  - {{name: later, needs: [slow], run: "true"}}
  - {{name: down, teardown: true, run: "echo done > down.txt"}}
""",
            on_event=on_event,
            stop=stop,
        )
        helper.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert statuses(report) == {"slow": "canceled", "fast": "passed", "later": "canceled", "down": "passed"}
    assert report.status == "canceled" and (tmp_path / "down.txt").exists()
    wait_for(lambda: not alive(read_pid(pidfile)), what="the child to die")


def test_secrets_printed_by_a_step_are_redacted_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("CCCI_TEST_SECRET", "sekrit-from-env-123")
    events = []
    report = run(
        tmp_path,
        """
steps:
  - name: leak
    run: 'echo "token=$FORGE; env=$MINE" ; echo "$MINE" >&2; echo "::metric x=1"; exit 1'
    env:
      FORGE: forge-token-abcdef
      MINE: {from_env: CCCI_TEST_SECRET, secret: true}
""",
        secrets=["forge-token-abcdef"],
        on_event=events.append,
    )
    text = report.to_json() + json.dumps([e.text for e in events])
    assert "forge-token-abcdef" not in text and "sekrit-from-env-123" not in text
    step = report.steps[0]
    assert step.stdout == "token=[redacted]; env=[redacted]\n::metric x=1\n"
    assert step.stderr == "[redacted]\n" and step.status == "failed" and report.status == "failed"
    assert [e.kind for e in events if e.step == "leak"][:2] == ["queued", "started"]
    assert [e.status for e in events if e.kind == "finished"] == ["failed"]


def test_a_machine_that_cannot_boot_makes_every_step_error(tmp_path):
    class Broken:
        name, isolated_forks = "broken", False

        def boot(self, workspace, image=None):
            raise PermanentInfraError("image missing")

    p = pipeline(tmp_path, "steps:\n  - {name: a, run: 'true'}\n  - {name: z, teardown: true, run: 'true'}\n")
    report = run_pipeline(p, Broken(), tmp_path, dict(ENV))
    assert statuses(report) == {"a": "error", "z": "error"} and report.status == "error"
    assert "image missing" in report.steps[0].stderr


def test_fork_from_with_a_shared_sandbox_runs_alone_and_says_so(tmp_path):
    report = run(
        tmp_path,
        """
parallelism: 4
steps:
  - {name: deploy, run: "echo state > deployed"}
  - {name: a, needs: [deploy], fork_from: deploy, run: "test -f deployed"}
  - {name: b, needs: [deploy], fork_from: deploy, run: "test -f deployed"}
""",
    )
    assert report.status == "passed"
    assert any("no isolated forks" in n and "step a" in n for n in report.notes)


HELLO = Path(__file__).resolve().parents[2] / "recipes" / "hello" / "ci.yml"


def git_checkout(path):
    path.mkdir()
    (path / "compose.yml").write_text("version: '3.8'\n")
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    return subprocess.run([*git[:3], "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def hello(workspace, sha):
    env = {**ENV, "RECIPE": "hello", "CCCI_SHA": sha, "APP_DOMAIN": "hello.ci.localhost"}
    return run_pipeline(load_pipeline(HELLO), BwrapExecutor(), workspace, env)


def test_the_hello_recipe_passes_on_the_commit_it_was_asked_to_test(tmp_path):
    head = git_checkout(tmp_path / "checkout")
    report = hello(tmp_path / "checkout", head)
    assert report.status == "passed", report.to_json(indent=2)
    assert [s.name for s in report.steps] == ["deploy", "checkout", "config", "metrics", "teardown"]
    assert f"HEAD is {head}" in report.steps[1].stdout
    assert report.steps[3].metrics["entries"] == 2  # .git and compose.yml
    assert report.total_ms < 5000 and not (tmp_path / "checkout" / ".ccci-hello").exists()


def test_the_hello_recipe_fails_on_another_commit_and_still_tears_down(tmp_path):
    git_checkout(tmp_path / "checkout")
    report = hello(tmp_path / "checkout", "0" * 40)
    assert statuses(report)["checkout"] == "failed" and report.status == "failed"
    assert statuses(report)["teardown"] == "passed"
    assert not (tmp_path / "checkout" / ".ccci-hello").exists()


def test_the_hello_recipe_refuses_an_empty_checkout(tmp_path):
    (tmp_path / "empty").mkdir()
    report = hello(tmp_path / "empty", "")
    assert statuses(report)["deploy"] == "failed" and statuses(report)["metrics"] == "skipped"
