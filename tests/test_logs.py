"""Log lines: one format with a time zone, the run a line is about, fields that cannot forge lines."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from ccci import logs

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d \[\d+\] (INFO|WARNING|ERROR) test\.logs( run=\S+)?: .*$"
)


@pytest.fixture
def captured():
    """Log through ccci's setup into a string; restore the process-wide state afterwards."""
    stream = io.StringIO()
    logs.setup("info", "text", stream=stream)
    yield stream
    logs.bind_run(None)
    logs.setup("info", "text")


def test_a_line_has_time_with_zone_pid_level_logger_and_the_run(captured):
    log = logging.getLogger("test.logs")
    log.info("plain")
    logs.for_run(log, 12).warning("finished: %s", "passed")
    first, second = captured.getvalue().splitlines()
    assert LINE.match(first) and ": plain" in first and "run=" not in first
    assert LINE.match(second) and " WARNING test.logs run=12: finished: passed" in second


def test_a_bound_run_marks_every_line_of_the_process(captured):
    logs.bind_run("local-7")
    logging.getLogger("test.logs").info("step output follows")
    logs.for_run(logging.getLogger("test.logs"), 3).info("about another run")
    bound, other = captured.getvalue().splitlines()
    assert "test.logs run=local-7: step output follows" in bound and "run=3: about another run" in other


def test_fields_are_pairs_and_a_value_cannot_start_a_line_of_its_own(captured):
    logging.getLogger("test.logs").info("webhook", extra=logs.fields(repo="o/r", reason="line\nFAKE ERROR", run=5))
    [line] = captured.getvalue().splitlines()
    assert line.endswith(': webhook repo=o/r reason="line\\nFAKE ERROR"') and " run=5: " in line


def test_the_json_format_is_one_object_a_line(captured):
    logs.setup("info", "json", stream=captured)
    logs.for_run(logging.getLogger("test.logs"), 9).info("webhook", extra=logs.fields(result="queued"))
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("test.logs").exception("failed")
    first, second = (json.loads(line) for line in captured.getvalue().splitlines())
    assert first["run"] == 9 and first["result"] == "queued" and first["message"] == "webhook"
    assert re.match(r"\d{4}-\d\d-\d\dT.*[+-]\d\d:\d\d$", first["time"]) and first["level"] == "INFO"
    assert "ValueError: boom" in second["exception"]


def test_setup_again_replaces_its_handler(captured):
    logs.setup("warning", "text", stream=captured)
    logging.getLogger("test.logs").info("hidden")
    logging.getLogger("test.logs").warning("shown")
    assert captured.getvalue().count("shown") == 1 and "hidden" not in captured.getvalue()
