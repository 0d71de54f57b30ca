"""The Docker benchmark stays runnable: a quick run (a container instead of the stack, no cold boot)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.vm.vmhelpers import REPO, abra_binary

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800), pytest.mark.xdist_group("docker")]


def test_the_docker_benchmark_runs_and_writes_its_table(docker_cache, tmp_path):
    out = tmp_path / "docker.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "docker_bench.py"), "--quick", "--state-dir", str(docker_cache),
         "--out", str(out), "--abra", str(abra_binary())],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert "# Docker fork benchmark (quick)" in table
    for row in ("Fork → first command", "Memory only that fork holds", "Two forks at once"):
        assert f"| {row}" in table, table
    assert "fork → first command:" in done.stderr
