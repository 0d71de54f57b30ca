"""The recipe benchmark runs (briefly: one check each way) and writes its table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.vm.vmhelpers import REPO, abra_binary

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800), pytest.mark.xdist_group("docker")]


def test_the_recipe_benchmark_runs_and_writes_its_table(docker_cache, tmp_path):
    out = tmp_path / "recipe.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "recipe_bench.py"), "--quick", "--state-dir", str(docker_cache),
         "--out", str(out), "--abra", str(abra_binary())],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert "# Recipe lifecycle benchmark (quick)" in table
    assert "| Deploy once, 1 check(s) in forks of the deployed app |" in table
    assert "forked" in table and "× re-deploys" in table
