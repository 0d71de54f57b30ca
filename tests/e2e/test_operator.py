"""The operator's view of a running ccci: its log lines, its metrics, its health, the admin list."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from ccci.store import Store
from tests.support import ROOT

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d \[\d+\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+"
    r"( run=\S+)?: "
)


def wait_until(probe, timeout: float = 30.0):
    """Poll ``probe`` until it returns something: the outbox is marked delivered in another process."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)  # state in another process's database: no event to wait on from here
    return value


def run_to_the_end(world, number: int = 7) -> int:
    """Deliver a !testme on a new PR and wait for its final comment; return the run id."""
    sha = world.open_pr(number)
    _, payload = world.comment(number, "!testme")
    run_id = world.deliver(payload).json()["run"]
    world.gitea.wait_for(lambda g: "success" in [s["state"] for s in g.statuses.get(sha, [])], timeout=90)
    world.gitea.wait_for(lambda g: any("passed" in c.body for c in world.ccci_comments(number)), timeout=30)
    return run_id


def test_gunicorn_and_ccci_write_one_format_and_lines_about_a_run_name_it(make_world):
    world = make_world()
    run_id = run_to_the_end(world)
    world.deliver({"repository": {"full_name": "someone/else"}}, secret="not-the-secret", **{"X-Gitea-Delivery": "d-9"})
    world.ccci.stop()  # every process has flushed and exited
    lines = [line for line in world.ccci.log_path.read_text().splitlines() if line.strip()]
    odd = [line for line in lines if not LINE.match(line)]
    assert not odd, odd[:5]
    text = "\n".join(lines)
    assert re.search(r" INFO gunicorn\.error: Listening at: http://127\.0\.0\.1:\d+", text)
    # The worker starts only once gunicorn listens; gunicorn's control socket is this STATE_DIR's.
    assert text.index("gunicorn.error: Listening at:") < text.index("ccci.web.server: worker started as pid")
    assert f"gunicorn.error: Control socket listening at {world.state_dir}/gunicorn.ctl" in text
    assert re.search(r' INFO gunicorn\.access: 127\.0\.0\.1 "POST /hooks/forge HTTP/1\.1" 202 ', text)
    assert re.search(rf" ccci\.web\.hooks run={run_id}: webhook delivery=\S+ event=pull_request_comment "
                     rf"repo=coop-cloud/hello status=202 result=queued", text)  # fmt: skip
    assert " ccci.web.hooks: webhook delivery=d-9 event=pull_request_comment repo=someone/else status=401 " in text
    assert f" ccci.worker run={run_id}: finished: passed" in text
    assert re.search(rf" ccci\.outbox run={run_id}: outbox \d+ \(run_comment\) delivered", text)
    # The harness is one run: each of its log lines names it.
    harness = (world.state_dir / "runs" / str(run_id) / "harness.log").read_text().splitlines()
    logged = [line for line in harness if LINE.match(line)]
    assert logged and all(f" run={run_id}: " in line for line in logged), logged[:5]


def test_log_format_json_makes_every_line_an_object(make_world):
    world = make_world(CCCI_LOG_FORMAT="json")
    requests.get(world.ccci.url + "/runs/1", timeout=10)
    world.deliver({"repository": {"full_name": "o/r"}}, secret="wrong")
    world.ccci.stop()
    objects = [json.loads(line) for line in world.ccci.log_path.read_text().splitlines() if line.strip()]
    assert all({"time", "pid", "level", "logger", "message"} <= set(o) for o in objects)
    assert any(o["logger"] == "gunicorn.access" and '"GET /runs/1 HTTP/1.1" 404' in o["message"] for o in objects)
    [hook] = [o for o in objects if o["logger"] == "ccci.web.hooks"]
    assert hook["result"] == "unauthorized" and hook["status"] == 401 and hook["repo"] == "o/r"


def test_metrics_and_health_of_a_serving_ccci(make_world):
    world = make_world()
    health = requests.get(world.ccci.url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["checks"]["worker"] == "ok"  # serve runs the worker
    run_id = run_to_the_end(world)

    def delivered() -> str | None:
        text = requests.get(world.ccci.url + "/metrics", timeout=10).text
        return text if "ccci_outbox_backlog 0.0" in text else None

    text = wait_until(delivered)
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip
    assert m[("ccci_runs_finished_total", (("outcome", "passed"),))] == 1
    assert m[("ccci_run_duration_seconds_count", ())] == 1 and m[("ccci_run_duration_seconds_sum", ())] > 0
    assert m[("ccci_run_queue_wait_seconds_count", ())] == 1
    assert m[("ccci_webhook_deliveries_total", (("result", "queued"),))] == 1
    assert m[("ccci_worker_last_pass_timestamp_seconds", ())] > 0
    [run] = world.admin("GET", "/admin/runs").json()["runs"]
    assert run["id"] == run_id and run["admitted"] is True and run["finished_at"].endswith("+00:00")


def test_serve_on_a_taken_port_fails_in_a_sentence_and_starts_no_worker(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCCI_")}
    env.update(PYTHONPATH=str(ROOT), CCCI_STATE_DIR=str(tmp_path / "state"), CCCI_LOCK_DIR=str(tmp_path / "locks"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "ccci", "serve", "--bind", f"127.0.0.1:{port}"], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert f"ccci: serve: 127.0.0.1:{port} is already in use" in done.stderr and "--bind" in done.stderr
    assert "worker started" not in done.stderr and "Traceback" not in done.stderr
    assert Store(tmp_path / "state" / "ccci.db").heartbeat("worker") is None  # no worker, no sweep


def test_serve_started_elsewhere_with_a_relative_state_dir_keeps_one_state(make_world, tmp_path):
    # A relative STATE_DIR is resolved once, where serve starts: the worker and each harness get
    # the absolute path, so the report lands where the worker looks (it used to say "interrupted").
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    world = make_world()
    world.ccci.stop()
    world.ccci.env = {**world.env, "CCCI_STATE_DIR": "state"}
    world.ccci.cwd = elsewhere
    world.ccci.start()
    run_id = run_to_the_end(world, 8)
    [comment] = world.ccci_comments(8)
    assert "passed" in comment.body and "interrupted" not in comment.body
    assert (elsewhere / "state" / "runs" / str(run_id) / "report.json").is_file()
    assert not (ROOT / "state").exists() and not (ROOT / "var").exists()
