"""The chaos drill stays runnable: a brief one (5 kills) in the default suite.

The real drill (200 kills, about 8 minutes) is ``make chaos``; this costs about 40 seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the drill runs steps as SANDBOX_USER, which needs root")
# A ccci bug the drill found (reported to the lead): a process SIGKILLed while it reaps a dead
# run's app leaves that reaper's STATE_DIR/runs/reap-* directory behind, and no sweep removes it.
# A brief drill hits it now and then; any other violation fails the test.
KNOWN = "reaper's run directory left:"


def test_a_brief_drill_kills_five_times_and_every_invariant_holds(tmp_path):
    summary = tmp_path / "summary.json"
    drill = subprocess.run(
        [sys.executable, "-m", "tests.chaos.drill", "--kills", "5", "--interval", "1", "--seed", "5",
         "--workdir", str(tmp_path / "drill"), "--json", str(summary)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    assert summary.exists(), drill.stdout[-6000:] + drill.stderr[-4000:]
    figures = json.loads(summary.read_text())
    violations = figures["violations"]
    known = [line for line in violations["nothing leaks"] if line.startswith(KNOWN)]
    violations["nothing leaks"] = [line for line in violations["nothing leaks"] if not line.startswith(KNOWN)]
    assert drill.returncode in (0, 1) and not any(violations.values()) and not figures["drill_errors"], (
        drill.stdout[-6000:] + drill.stderr[-4000:]
    )
    assert figures["kills_total"] == 5 and figures["serve_restarts"] == figures["kills"]["master"]
    assert figures["traffic"]["accepted_202"] >= 9  # the opening burst: one run per pull request
    assert figures["runs_in_store"] >= figures["traffic"]["accepted_202"]  # some answers were lost in a kill
    assert "ok    exactly one final report" in drill.stdout
    if known:
        pytest.xfail(f"the known reaper-directory leak: {known[0]}")
    assert drill.returncode == 0
