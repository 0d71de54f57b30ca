"""A run in a QEMU microVM fork, canceled mid-step through the admin API: the machine is gone.

Real QEMU (TCG here); the guest image comes from the VM suite's cache, so this costs a fork,
not a build. Skipped with the reason where QEMU is not installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests

from tests.e2e.conftest import final_comment, wait_until
from tests.vm.vmhelpers import shared_vm_state

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"),
]

VM_CI = """\
image: tiny
timeout: 300
steps:
  - name: work
    timeout: 200
    run: echo "working in $(hostname)"; sleep 250
  - name: teardown
    teardown: true
    run: echo torn down in $(hostname)
"""


def qemu_pids(state_dir: Path) -> list[int]:
    """Return the QEMU processes whose command line mentions ``state_dir``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in argv and str(state_dir) in argv:
                pids.append(int(entry.name))
    return pids


def test_cancel_a_run_in_a_microvm_fork(make_world, tmp_path):
    state = shared_vm_state(tmp_path)  # the STATE_DIR make_world's ccci uses
    recipes = tmp_path / "recipes" / "hello"
    recipes.mkdir(parents=True)
    (recipes / "ci.yml").write_text(VM_CI)

    world = make_world(CCCI_EXECUTOR="qemu", CCCI_RECIPES_DIR=str(recipes.parent))
    world.open_pr(50)
    _, payload = world.comment(50, "!testme")
    run_id = world.deliver(payload).json()["run"]
    log_url = f"{world.ccci.url}/runs/{run_id}/log"
    wait_until(lambda: "[work] working in" in requests.get(log_url, timeout=10).text, timeout=120,
               what="the step to run in the VM")  # fmt: skip
    assert qemu_pids(state), "the step is not running in a QEMU fork"

    assert world.admin("POST", f"/admin/runs/{run_id}/cancel").status_code == 202
    final_comment(world, 50, "canceled")
    report = requests.get(f"{world.ccci.url}/runs/{run_id}", headers={"Accept": "application/json"}, timeout=10)
    steps = {s["name"]: s for s in report.json()["report"]["steps"]}
    assert steps["work"]["status"] == "canceled" and steps["teardown"]["status"] == "passed"
    assert "torn down in" in steps["teardown"]["stdout"]
    wait_until(lambda: not qemu_pids(state), timeout=30, what="QEMU to exit")
    leftovers = [p.name for p in (state / "vm").iterdir() if p.name.startswith(("fork-", "ckpt-"))]
    assert leftovers == []
    assert not any(lock["held"] for lock in world.admin("GET", "/admin/runs").json()["locks"])


def test_the_pipelines_setup_prepares_the_warm_base_every_fork_starts_from(tmp_path):
    """`ccci test` with EXECUTOR=qemu: setup ran once in the base; each fork sees its result."""
    import json
    import os
    import subprocess
    import sys

    state = shared_vm_state(tmp_path)
    recipe = tmp_path / "prepared"
    recipe.mkdir()
    marker = f"prepared-{os.getpid()}-{tmp_path.name}"  # a setup no other test has: a fresh warm base
    (recipe / "ci.yml").write_text(
        "image: tiny\n"
        f"setup: echo {marker} > /etc/prepared\n"
        "steps:\n"
        "  - name: first\n    run: cat /etc/prepared; echo mine > /etc/prepared\n"
        "  - name: second\n    needs: [first]\n    run: cat /etc/prepared\n"
        "  - name: keep\n    run: mkdir -p .ccci/artifacts/out && hostname > .ccci/artifacts/out/host.txt\n"
    )
    source = tmp_path / "src"
    source.mkdir()
    (source / "README.md").write_text("x\n")
    env = {**os.environ, "CCCI_STATE_DIR": str(state), "CCCI_LOCK_DIR": str(tmp_path / "locks"),
           "CCCI_ABRA_HOME": str(tmp_path / "abra"), "CCCI_EXECUTOR": "qemu"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "ccci", "test", str(recipe), "--source", str(source), "--json"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {s["name"]: s for s in json.loads(done.stdout)["steps"]}
    assert steps["first"]["stdout"] == f"{marker}\n"
    assert steps["second"]["stdout"] == "mine\n"  # the run's one machine: the first step's write is there
    assert "qemu microVM forks" in done.stderr
    # Results out: the file a step wrote in the guest is kept with the run on the host.
    report = json.loads(done.stdout)
    assert report["artifacts"] == ["out/host.txt"]
    [kept] = (state / "runs").glob("*/artifacts/out/host.txt")
    assert kept.read_text().startswith("fork-")  # written inside the fork, whose hostname it is
