"""bench/gitea_bench.py stays runnable: one round, its report, the requests it counts."""

from __future__ import annotations

import subprocess
import sys

from tests.e2e.conftest import ROOT


def test_the_gitea_bench_runs_one_round(tmp_path):
    out = tmp_path / "gitea.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gitea_bench.py"), "--rounds", "1", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    for row in ("| users | eyes |", "| orgs | queued |", "| GET comments | 1 | 1 |", "| GET org member | 0 | 1 |"):
        assert row in report, report
