"""Report model, verdict, bounded output, metrics and redaction."""

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ccci.pipeline.output import StreamBuffer, parse_metric
from ccci.pipeline.redact import MARKER, Redactor
from ccci.pipeline.report import Report, StepResult, verdict

CONTRACT_KEYS = {"run", "recipe", "sha", "status", "passed", "total_ms", "steps"}
STEP_KEYS = {
    "name", "status", "exit_code", "duration_ms", "cached", "allow_failure",
    "metrics", "stdout", "stderr", "infra_retries",
}  # fmt: skip


def test_report_serialises_every_contract_key_and_round_trips():
    steps = [
        StepResult("a", "passed", 0, 12, metrics={"rps": 3.5}, stdout="hi\n"),
        StepResult("b", "skipped"),
    ]
    report = Report(run=7, recipe="hello", sha="abc", status="failed", total_ms=40, steps=steps)
    data = json.loads(report.to_json())
    assert set(data) >= CONTRACT_KEYS and data["passed"] is False and data["run"] == 7
    assert all(set(s) >= STEP_KEYS for s in data["steps"])
    assert data["steps"][0]["metrics"] == {"rps": 3.5} and data["steps"][1]["exit_code"] is None
    assert Report.from_dict(data) == report


def test_unknown_statuses_are_refused():
    with pytest.raises(ValueError):
        StepResult("a", "ok")
    with pytest.raises(ValueError):
        Report(run=1, recipe="r", sha="s", status="skipped", total_ms=0)


@pytest.mark.parametrize(
    ("statuses", "stopped", "expected"),
    [
        ([], None, "passed"),
        (["passed", "passed"], None, "passed"),
        (["passed", "failed"], None, "failed"),
        (["failed", "skipped"], None, "failed"),
        (["failed", "error"], None, "error"),
        (["error", "canceled"], None, "canceled"),
        (["canceled", "timed_out"], None, "timed_out"),
        (["passed"], "canceled", "canceled"),
        (["failed", "canceled"], "timed_out", "timed_out"),
    ],
)
def test_verdict_follows_precedence(statuses, stopped, expected):
    assert verdict([StepResult(str(i), s) for i, s in enumerate(statuses)], stopped) == expected


def test_allowed_failures_do_not_fail_the_run_but_their_skipped_dependents_do():
    allowed = StepResult("lint", "failed", 1, allow_failure=True)
    assert verdict([allowed, StepResult("ok", "passed", 0)]) == "passed"
    assert verdict([allowed, StepResult("after-lint", "skipped")]) == "failed"


def test_metrics_are_parsed_from_metric_lines_only():
    assert parse_metric(b"::metric latency_ms=12.5") == ("latency_ms", 12.5)
    assert parse_metric(b"  ::metric count=3  ") == ("count", 3)
    for bad in (b"::metric x=abc", b"::metric x=nan", b"echo ::metric x=1", b"::metric =1", b"::metricx=1"):
        assert parse_metric(bad) is None
    buf = StreamBuffer(64, metrics=True)
    for chunk in (b"noise\n::met", b"ric a=1\n", b"x" * 500 + b"\n::metric b=2.25"):
        buf.write(chunk)
    buf.finish(Redactor())
    assert buf.metrics == {"a": 1, "b": 2.25}  # 'a' was in the cut middle, 'b' had no newline


@example(data=b"\xc2\x80", limit=2, chunk=1)  # a character split across head and tail, nothing cut
@given(st.binary(max_size=5000), st.integers(min_value=2, max_value=800), st.integers(1, 50))
def test_bounded_output_keeps_head_and_tail_within_limit(data, limit, chunk):
    buf = StreamBuffer(limit)
    for i in range(0, len(data), chunk):
        buf.write(data[i : i + chunk])
    text = buf.finish(Redactor())
    full = data.decode("utf-8", "replace")
    if len(data) <= limit:
        assert text == full
    else:
        dropped = len(data) - limit
        assert f"[ccci: {dropped} bytes of output cut here]" in text
        tail = data[-(limit - limit // 2) :]
        assert text.endswith(tail.decode("utf-8", "replace"))
        assert len(text.encode()) <= 3 * limit + 100  # replacement chars may triple a byte


def test_redaction_replaces_longest_first_and_across_chunks():
    r = Redactor(["token", "token-long-secret", ""])
    assert r("a token-long-secret and token") == f"a {MARKER} and {MARKER}"
    assert r.redact_bytes(b"xtokenx") == f"x{MARKER}x".encode()
    buf = StreamBuffer(1000)
    for chunk in (b"value=tok", b"en-long-se", b"cret\n"):
        buf.write(chunk)
    assert buf.finish(r) == f"value={MARKER}\n"


def test_a_secret_cut_in_half_by_truncation_does_not_leak():
    secret = "S3CRET-VALUE-0123456789"
    r = Redactor([secret])
    buf = StreamBuffer(40)
    buf.write(b"a" * 10 + secret.encode() + b"b" * 100 + secret.encode() + b"c" * 5)
    text = buf.finish(r)
    assert "cut here" in text
    for k in range(6, len(secret)):
        assert secret[:k] not in text and secret[-k:] not in text
