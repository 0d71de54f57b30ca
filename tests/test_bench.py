"""Every benchmark stays runnable: each is run here briefly, end to end, into a scratch results file.

The figures of a brief run mean little; what is tested is that the benchmark still works against
today's code (``webhook_bench.py`` once broke on RUNS_PER_HOUR and nobody noticed). A target
the brief run misses is reported, not failed: noise on a shared machine is not a regression.
Cost: about 5 s for the webhook bench, 15-30 s for the VM bench (under TCG, warm image cached).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from ccci.vm.host import qemu_binary
from tests.support import ROOT


def run_bench(*args: str) -> tuple[subprocess.CompletedProcess, str]:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done, done.stdout


def test_the_webhook_bench_runs(tmp_path):
    out = tmp_path / "webhook.md"
    done, stdout = run_bench("bench/webhook_bench.py", "--requests", "20", "--out", str(out))
    assert done.returncode == 0 or "NOT met" in stdout, done.stderr[-3000:]
    text = out.read_text()
    assert "| queued |" in text and "| ignored |" in text and "| trivial |" in text and "Target:" in text


@pytest.mark.vm
def test_the_vm_bench_runs(tmp_path):
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/install installs it)")
    from tests.vm.vmhelpers import shared_vm_state

    out = tmp_path / "vm.md"
    done, stdout = run_bench("bench/vm_bench.py", "--quick", "--state-dir", str(shared_vm_state(tmp_path)),
                             "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "Fork → first output (median of 2)" in text and "A quick smoke run" in text
