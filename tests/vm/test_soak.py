"""Leak soak: hundreds of fork-run-destroy cycles with stable memory, fds and files.

Not in the default suite: ``.venv/bin/pytest -m soak tests/vm`` (about 2 minutes under TCG).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ccci.vm.sweep import processes_using
from tests.vm.vmhelpers import fork_files, run

pytestmark = [pytest.mark.vm, pytest.mark.soak]
CYCLES = int(os.environ.get("CCCI_SOAK_CYCLES", "300"))


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_hundreds_of_fork_run_destroy_cycles_leak_nothing(executor, workspace, state_dir):
    executor.warm_base()

    def cycle(i: int) -> None:
        with executor.boot(workspace) as machine:
            result, out, _ = run(machine, f"echo cycle {i}")
            assert result.exit_code == 0 and out == f"cycle {i}\n"

    samples = []
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, CYCLES, 50):
            list(pool.map(cycle, range(start, min(start + 50, CYCLES))))
            samples.append((_rss_kib(), _fds(), len(fork_files(state_dir))))
    warm_rss, warm_fds, _ = samples[0]
    end_rss, end_fds, _ = samples[-1]
    assert all(files == 0 for _, _, files in samples), samples
    assert end_fds <= warm_fds, samples
    assert end_rss - warm_rss < 32 * 1024, samples  # KiB: well under a fork's worth of memory
    assert processes_using(state_dir) == []
