"""The run page as people see it: rendered by headless Chromium from the real app under gunicorn.

A finished run shows its verdict, one table row per step with status, exit code and metrics,
and its log. A running run follows its log as the harness appends to it and turns into the
final page by itself when the run ends. Names and log lines are text, never markup.
"""

from __future__ import annotations

import itertools
import json

import pytest

from ccci.harness.runfiles import LOG_PAGE, RunFiles

pytestmark = pytest.mark.browser

_comments = itertools.count(1000)

STEPS_JS = """JSON.stringify([...document.querySelectorAll('#steps tr')].slice(1).map(
    tr => [...tr.cells].map(td => td.textContent.trim())))"""


def step(name: str, status: str, exit_code: int | None, duration_ms: int, metrics: dict | None = None) -> dict:
    """Return one step of a report, shaped as the harness writes it."""
    return {
        "name": name, "status": status, "exit_code": exit_code, "duration_ms": duration_ms, "cached": False,
        "allow_failure": False, "metrics": metrics or {}, "stdout": "", "stderr": "", "infra_retries": 0,
    }  # fmt: skip


def report(run_id: int, status: str, steps: list[dict]) -> dict:
    """Return a final report for ``run_id``."""
    return {
        "run": run_id, "recipe": "hello", "sha": "ab" * 20, "status": status, "passed": status == "passed",
        "total_ms": sum(s["duration_ms"] for s in steps), "steps": steps,
    }  # fmt: skip


def make_run(web, **fields) -> int:
    """Record a run the way intake does (a claimed comment) and return its id."""
    run = {"recipe": "hello", "pr": 7, "requester": "alice", "clone_url": "http://forge.test/coop-cloud/hello.git"}
    claimed, made = web.store.claim_comment(
        owner="coop-cloud", repo="hello", comment_id=next(_comments), action="run", run={**run, **fields}
    )
    assert claimed and made is not None
    return made.id


def test_finished_run_shows_verdict_steps_metrics_and_log(web, page, tmp_path):
    steps = [
        step("deploy", "passed", 0, 4200, {"deploy_seconds": 4.2}),
        step("smoke", "failed", 3, 1250, {"http_ms": 87, "checks": 12}),
        step("undeploy", "passed", 0, 800),
    ]
    run_id = make_run(web, sha="ab" * 20, state="failed", report=json.dumps(report(1, "failed", steps)))
    files = RunFiles(web.runs_dir, run_id)
    files.create()
    files.log.write_text("deploy | deployed hello.ci.localhost\nsmoke | GET / -> 502\nundeploy | removed\n")

    page.goto(f"{web.url}/runs/{run_id}")
    page.wait_for("document.getElementById('log').textContent.includes('undeploy | removed')")

    assert page.eval("document.getElementById('verdict').textContent") == "failed"
    assert page.eval("document.getElementById('verdict').className") == "verdict failed"
    assert json.loads(page.eval(STEPS_JS)) == [
        ["deploy", "passed", "0", "4.20 s", "deploy_seconds=4.2"],
        ["smoke", "failed", "3", "1.25 s", "http_ms=87 checks=12"],
        ["undeploy", "passed", "0", "0.80 s", ""],
    ]
    text = page.text()
    assert f"ccci run #{run_id}: failed" in text
    assert "coop-cloud/hello#7" in text and "ab" * 20 in text and "6.2 s" in text
    assert page.eval("document.getElementById('log').textContent") == files.log.read_text()
    assert page.exceptions() == []

    shot = page.screenshot(tmp_path / "run.png")
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_running_run_follows_its_log_and_shows_the_verdict_without_a_reload(web, page):
    run_id = make_run(web, sha="cd" * 20, state="running", admitted=1, authorized=1)
    files = RunFiles(web.runs_dir, run_id)
    files.create()
    files.log.write_text("deploy | starting\n")

    page.goto(f"{web.url}/runs/{run_id}")
    page.wait_for("document.getElementById('log').textContent === 'deploy | starting\\n'")
    assert page.eval("document.getElementById('verdict').textContent") == "running"
    assert page.eval("document.getElementById('steps')") is None
    # Mark this document: if anything but the page itself reloaded it, the mark would be gone
    # too, but the page must not need anyone to.
    page.eval("window.__opened = true")

    with files.log.open("a") as log:
        log.write("deploy | deployed hello.ci.localhost\nsmoke | ok\n")
    page.wait_for("document.getElementById('log').textContent.endsWith('smoke | ok\\n')")
    assert page.eval("document.getElementById('log').textContent") == files.log.read_text()
    assert page.eval("window.__opened") is True  # followed in place, not reloaded
    assert page.eval("document.getElementById('verdict').textContent") == "running"

    # The run ends: its last lines and report are written, then its state changes.
    with files.log.open("a") as log:
        log.write("undeploy | removed\n")
    steps = [step("deploy", "passed", 0, 3000), step("smoke", "passed", 0, 500), step("undeploy", "passed", 0, 700)]
    final = report(run_id, "passed", steps)
    files.write_report(final)
    assert web.store.update_run(run_id, only_if_state=("running",), state="passed", report=final)

    page.wait_for(
        "document.getElementById('verdict').textContent === 'passed' && document.getElementById('steps') !== null"
        " && document.getElementById('log').textContent.endsWith('undeploy | removed\\n')"
    )
    assert page.eval("document.getElementById('verdict').className") == "verdict passed"
    assert [row[:2] for row in json.loads(page.eval(STEPS_JS))] == [
        ["deploy", "passed"],
        ["smoke", "passed"],
        ["undeploy", "passed"],
    ]
    assert page.eval("document.getElementById('log').textContent") == files.log.read_text()
    assert page.exceptions() == []


def test_run_page_keeps_following_across_a_server_restart(web, page):
    run_id = make_run(web, sha="12" * 20, state="running", admitted=1, authorized=1)
    files = RunFiles(web.runs_dir, run_id)
    files.create()
    files.log.write_text("deploy | starting\n")
    page.goto(f"{web.url}/runs/{run_id}")
    page.wait_for("document.getElementById('log').textContent === 'deploy | starting\\n'")

    # An operator restarts ccci-web while someone watches: the page's requests fail for a while.
    page.send("Network.enable")
    web.stop()
    with files.log.open("a") as log:
        log.write("deploy | deployed\n")
    failed = page.wait_for_event("Network.loadingFailed")
    # Refused once the port is closed; reset, empty or aborted for a request caught mid-stop.
    assert failed["params"]["errorText"].startswith("net::ERR_"), failed["params"]
    web.start()

    page.wait_for("document.getElementById('log').textContent.endsWith('deploy | deployed\\n')")
    assert page.eval("document.getElementById('log').textContent") == files.log.read_text()
    assert page.exceptions() == []


def test_finished_run_shows_a_log_longer_than_one_page(web, page):
    run_id = make_run(web, sha="34" * 20, state="passed", report=json.dumps(report(1, "passed", [])))
    files = RunFiles(web.runs_dir, run_id)
    files.create()
    line = "smoke | " + "x" * 91 + "\n"  # 100 bytes
    files.log.write_text(line * (LOG_PAGE // 100 * 3 // 2) + "the end\n")  # one and a half pages

    page.goto(f"{web.url}/runs/{run_id}")
    size = files.log.stat().st_size
    page.wait_for(f"document.getElementById('log').textContent.length === {size}")
    assert page.eval("document.getElementById('log').textContent.endsWith('x\\nthe end\\n')")


def test_markup_in_step_names_and_log_is_shown_as_text(web, page):
    evil_step = '<script>window.__pwned = "step"</script><b id="injected">bold</b>'
    evil_log = '<img src=x onerror="window.__pwned = \'log\'"><script>window.__pwned = "log"</script>\n'
    steps = [step(evil_step, "passed", 0, 10, {"<i>k</i>": 1})]
    run_id = make_run(
        web, sha="ef" * 20, state="passed", requester="<script>window.__pwned='requester'</script>",
        report=json.dumps(report(1, "passed", steps)),
    )  # fmt: skip
    files = RunFiles(web.runs_dir, run_id)
    files.create()
    files.log.write_text(evil_log)

    page.goto(f"{web.url}/runs/{run_id}")
    page.wait_for("document.getElementById('log').textContent.length > 0")

    assert page.eval("document.getElementById('log').textContent") == evil_log
    assert json.loads(page.eval(STEPS_JS))[0][0] == evil_step
    assert "<script>window.__pwned='requester'</script>" in page.text()
    # Nothing was parsed as markup: the page's own script is the only one, no injected element,
    # no image, and none of the payloads ran.
    assert page.eval("document.querySelectorAll('script').length") == 1
    assert page.eval("document.querySelectorAll('#injected, img, i').length") == 0
    assert page.eval("typeof window.__pwned") == "undefined"
    assert page.exceptions() == []
