"""The PR comment and the terminal progress: content, limits, redaction, marker, staleness."""

import io
from pathlib import Path

from ccci.pipeline.events import Event, StepBoard
from ccci.pipeline.progress import TerminalProgress
from ccci.pipeline.render import render_comment, render_progress
from ccci.pipeline.report import Report, StepResult
from ccci.pipeline.scheduler import run_pipeline
from ccci.pipeline.spec import load_pipeline
from ccci.vm.bwrap import BwrapExecutor

SHA = "0123456789abcdef" * 2 + "01234567"


def report_with(output: str, **kw) -> Report:
    steps = [
        StepResult("deploy", "passed", 0, 1200, metrics={"ms": 12.5}),
        StepResult("check|x", "failed", 2, 800, stdout=output, stderr="boom\n"),
        StepResult("after", "skipped"),
    ]
    return Report(run=9, recipe="hello", sha=SHA, status="failed", total_ms=2500, steps=steps, **kw)


def test_final_comment_has_verdict_table_failing_tail_link_and_marker():
    out = "".join(f"line {i}\n" for i in range(500))
    text = render_comment(report_with(out), marker_run_id=9, public_url="https://ci.example/", tested_sha=SHA)
    assert text.startswith("<!-- ccci:run=9 -->\n### ❌ failed — `hello` at `0123456789` in 2.5 s")
    assert "| ✅ | deploy | passed | 1.2 s | ms=12.5 |" in text and "check\\|x" in text
    assert "<details><summary>Last lines of <code>check|x</code> (failed, exit 2)" in text
    assert "line 499" in text and "line 400" not in text and "boom" in text
    assert "[Full log](https://ci.example/runs/9/log)" in text and "Stale" not in text


def test_comment_stays_under_the_limit_and_keeps_the_tail_whatever_the_output():
    huge = "x" * 200_000 + "\n" + "`" * 10 + "\nTHE-END\n"
    for limit in (60000, 5000, 1200):
        text = render_comment(report_with(huge), marker_run_id=9, public_url="", tested_sha=SHA, limit=limit)
        assert len(text) < limit and "THE-END" in text
    many = [StepResult(f"step-{i}-" + "n" * 100, "passed", 0, 5) for i in range(2000)]
    big = Report(run=1, recipe="r", sha=SHA, status="passed", total_ms=1, steps=many)
    text = render_comment(big, marker_run_id=1, public_url="", tested_sha=SHA)
    assert len(text) < 60000 and "more steps" in text and text.startswith("<!-- ccci:run=1 -->")


def test_stale_note_when_the_head_moved():
    text = render_comment(report_with("x"), marker_run_id=9, tested_sha=SHA, head_sha="f" * 40)
    assert "Stale" in text and "`ffffffffff`" in text


def test_progress_comments_carry_the_marker_and_live_states():
    queued = render_progress("queued", marker_run_id=3, recipe="hello", tested_sha=SHA, position=2)
    assert queued.startswith("<!-- ccci:run=3 -->") and "position 2" in queued
    board = StepBoard()
    for e in [Event("queued", "a", 0), Event("queued", "b", 0), Event("started", "a", 1)]:
        board.update(e)
    board.update(Event("finished", "a", 2, "passed", 1500, 0))
    board.update(Event("started", "b", 2))
    running = render_progress("running", marker_run_id=3, recipe="hello", tested_sha=SHA, steps=board.rows())
    assert "| ✅ | a | passed | 1.5 s |" in running and "| 🔄 | b | running |" in running


def test_a_secret_printed_by_a_step_never_reaches_the_comment(tmp_path):
    (tmp_path / "ci.yml").write_text("steps:\n  - {name: leak, run: 'echo the-token-value-42; exit 1'}\n")
    report = run_pipeline(
        load_pipeline(tmp_path / "ci.yml"),
        BwrapExecutor(use_bwrap=False),
        tmp_path,
        {"RECIPE": "r"},
        secrets=["the-token-value-42"],
    )
    text = render_comment(report, marker_run_id=1, tested_sha=SHA)
    assert "the-token-value-42" not in text and "[redacted]" in text


def test_terminal_progress_prints_a_line_per_start_and_finish(tmp_path):
    stream = io.StringIO()
    printer = TerminalProgress(stream)
    hello = Path(__file__).resolve().parents[2] / "recipes" / "hello" / "ci.yml"
    (tmp_path / "f").write_text("x")
    report = run_pipeline(load_pipeline(hello), BwrapExecutor(), tmp_path, {"RECIPE": "hello"}, on_event=printer)
    printer.summary(report)
    lines = stream.getvalue().splitlines()
    assert sum("▶" in line for line in lines) == 5 and sum("passed" in line for line in lines) == 6
    assert lines[-1].startswith("✅ hello: passed") and "5/5 steps passed" in lines[-1]
    assert not any("│" in line for line in lines)  # not a TTY: no output echo


def test_a_multi_line_note_keeps_its_lines_in_a_code_block():
    first = "hello/ci.yml, line 3, column 14: not valid YAML: mapping values are not allowed here"
    note = first + "\n        run: echo: x\n                 ^"
    report = Report(run=2, recipe="hello", sha=SHA, status="error", total_ms=5, notes=[note])
    text = render_comment(report, marker_run_id=2, tested_sha=SHA)
    assert f"- {first}\n\n  ```text\n" in text
    assert "\n          run: echo: x\n                   ^\n  ```" in text  # indented under the item, caret kept


def test_the_comment_links_the_run_page_the_log_and_the_commit():
    repo = "https://git.example/coop-cloud/hello"
    text = render_comment(report_with("x"), marker_run_id=9, public_url="https://ci.example", tested_sha=SHA,
                          repo_url=repo)  # fmt: skip
    assert f"at [`0123456789`]({repo}/commit/{SHA}) in 2.5 s" in text
    assert "[Run page](https://ci.example/runs/9) · [Full log](https://ci.example/runs/9/log)" in text
    queued = render_progress("queued", marker_run_id=9, recipe="hello", tested_sha=SHA, public_url="https://ci.example",
                             repo_url=repo)  # fmt: skip
    assert f"[`0123456789`]({repo}/commit/{SHA})" in queued and "[Run page](https://ci.example/runs/9)" in queued
    # Before the sha is pinned there is no commit to link.
    early = render_progress("queued", marker_run_id=9, recipe="hello", tested_sha="PR head", repo_url=repo)
    assert "`PR head`" in early and "/commit/" not in early


def test_a_step_allowed_to_fail_that_failed_shows_a_warning_not_a_failure():
    steps = [StepResult("lint", "failed", 1, 10, allow_failure=True), StepResult("deploy", "failed", 2, 10)]
    report = Report(run=3, recipe="hello", sha=SHA, status="failed", total_ms=20, steps=steps)
    text = render_comment(report, marker_run_id=3, tested_sha=SHA)
    assert "| ⚠️ | lint | failed (allowed) |" in text and "| ❌ | deploy | failed |" in text


def test_the_failing_steps_excerpt_shows_the_error_before_the_output():
    out = "".join(f"progress {i}\n" for i in range(100))
    text = render_comment(report_with(out), marker_run_id=9, tested_sha=SHA)
    assert text.index("stderr:") < text.index("boom") < text.index("stdout:") < text.index("progress 99")


def test_the_comment_says_where_the_app_ran_and_the_report_keeps_it():
    fork = render_comment(report_with("x", mode="fork"), marker_run_id=9, tested_sha=SHA)
    host = render_comment(report_with("x", mode="host"), marker_run_id=9, tested_sha=SHA)
    assert "Ran in a VM fork" in fork and "the operator's abra server" in host
    assert "Ran in" not in render_comment(report_with("x"), marker_run_id=9, tested_sha=SHA)  # nothing ran
    report = report_with("x", mode="fork")
    assert report.to_dict()["mode"] == "fork" and Report.from_dict(report.to_dict()).mode == "fork"
