"""Machine lifecycle: checkpoints and fork_from, the warm-base cache, supervision, the sweep."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from ccci.config import load_settings
from ccci.errors import InfraError, PermanentInfraError, TransientInfraError
from ccci.pipeline.executor import ExecRequest
from ccci.pipeline.scheduler import run_pipeline
from ccci.pipeline.spec import parse_pipeline
from ccci.vm import qemu as qemu_module
from ccci.vm.choose import choose_executor
from ccci.vm.qemu import QemuExecutor
from ccci.vm.sweep import processes_using, sweep_vms
from tests.vm.vmhelpers import fork_files, run

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[2]


def test_checkpoint_forks_start_from_the_parents_state(executor, workspace, state_dir):
    with executor.boot(workspace) as parent:
        assert run(parent, "echo deployed > state.txt; echo on-disk > /var/lib/ccci/d; sync")[0].exit_code == 0
        with parent.checkpoint() as checkpoint:
            # The parent keeps running after its checkpoint and its later writes stay its own.
            assert run(parent, "echo later > later.txt")[0].exit_code == 0
            with checkpoint.fork() as a, checkpoint.fork() as b:
                _, out, _ = run(a, "pwd; cat state.txt /var/lib/ccci/d; ls later.txt 2>&1; echo a > only-a")
                assert out.splitlines()[:3] == [str(workspace), "deployed", "on-disk"]
                assert "No such file" in out
                _, out, _ = run(b, "ls only-a 2>&1; hostname")
                assert "No such file" in out and out.split()[-1] == b.name != a.name
    assert fork_files(state_dir) == []


def test_fork_from_in_a_pipeline_runs_each_branch_in_its_own_fork(executor, workspace, state_dir):
    branch = "cat state.txt && echo {0} > mine && test ! -e ../{1} && ls | grep -c mine"
    spec = {
        "image": "tiny",
        "steps": [
            {"name": "deploy", "run": "echo deployed > state.txt"},
            {"name": "test-a", "needs": ["deploy"], "fork_from": "deploy", "run": branch.format("a", "b")},
            {"name": "test-b", "needs": ["deploy"], "fork_from": "deploy", "run": branch.format("b", "a")},
        ],
    }
    pipeline = parse_pipeline(spec, workspace / "ci.yml")
    report = run_pipeline(pipeline, executor, workspace, {"RECIPE": "hello"}, host_env={})
    assert report.status == "passed", report
    by_name = {s.name: s for s in report.steps}
    assert by_name["test-a"].stdout == by_name["test-b"].stdout == "deployed\n1\n"
    assert fork_files(state_dir) == []


def test_warm_base_is_cached_by_image_and_setup_and_pinned_while_used(state_dir, workspace):
    # Pruning takes every unpinned base of the directory: this test's bases are its own, so
    # that it never prunes the shared cache (the docker base costs minutes to boot again).
    (state_dir / "vm" / "bases").unlink()
    (state_dir / "vm" / "bases").mkdir()
    setup = f"echo {uuid.uuid4().hex} > /root/setup-marker"
    first = QemuExecutor(state_dir, setup=setup).warm_base()
    assert not first.cached
    again = QemuExecutor(state_dir, setup=setup)
    base = again.warm_base()
    assert base.cached and base.dir == first.dir
    with again.boot(workspace) as machine:
        assert run(machine, "cat /root/setup-marker")[1] == setup.split()[1] + "\n"
        # In use by a live fork: pruning leaves it, however old.
        assert str(base.dir) not in sweep_vms(state_dir, prune_bases_after=0)
        assert base.mem.exists()
    assert str(base.dir) in sweep_vms(state_dir, prune_bases_after=0)
    assert not base.dir.exists()


def test_a_failed_setup_means_no_machine_can_be_provided(state_dir, workspace):
    executor = QemuExecutor(state_dir, setup=f"echo broken-{uuid.uuid4().hex}; exit 7")
    with pytest.raises(PermanentInfraError, match="exited 7"):
        executor.boot(workspace)
    assert fork_files(state_dir) == []


def test_transient_start_failures_are_retried_and_counted(executor, workspace, state_dir, monkeypatch):
    real_restore = qemu_module.restore
    failures = iter([True, False])

    def crash(vm):
        os.kill(vm.pid, signal.SIGKILL)  # a real failure: the QEMU under restore dies
        vm.process.wait()

    def flaky_restore(vm, state, device_only):
        if next(failures, False):
            crash(vm)
        return real_restore(vm, state, device_only)

    monkeypatch.setattr(qemu_module, "restore", flaky_restore)
    with executor.boot(workspace) as machine:
        first = machine.exec(ExecRequest("true"))
        second = machine.exec(ExecRequest("true"))
    assert (first.infra_retries, second.infra_retries) == (1, 0)

    monkeypatch.setattr(
        qemu_module, "restore", lambda vm, state, device_only: vm.kill() or real_restore(vm, state, True)
    )
    with pytest.raises(TransientInfraError, match="after 3 attempts"):
        executor.boot(workspace)
    assert fork_files(state_dir) == []


def test_a_machine_that_crashes_mid_step_is_an_infrastructure_failure(executor, workspace):
    started = threading.Event()
    with executor.boot(workspace) as machine:
        killer = threading.Thread(target=lambda: started.wait(30) and os.kill(machine.pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(PermanentInfraError, match="lost during the step"):
            machine.exec(ExecRequest("echo go; sleep 1000", on_output=lambda s, c: started.set()))
        killer.join()
        with pytest.raises(InfraError):
            machine.exec(ExecRequest("true"))


def test_a_machine_that_hangs_past_its_hard_timeout_is_killed(state_dir, workspace):
    executor = QemuExecutor(state_dir, kill_grace=1.0)
    started = threading.Event()
    with executor.boot(workspace) as machine:
        # Freeze the whole guest once the step runs: the kill never lands, the grace runs out.
        freezer = threading.Thread(target=lambda: started.wait(30) and os.kill(machine.pid, signal.SIGSTOP))
        freezer.start()
        with pytest.raises(PermanentInfraError, match="did not stop"):
            machine.exec(ExecRequest("echo go; sleep 1000", timeout=1.0, on_output=lambda s, c: started.set()))
        freezer.join()
        assert machine.vm is not None and not machine.vm.alive()


OWNER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from ccci.vm.qemu import QemuExecutor
    machine = QemuExecutor(Path(sys.argv[2])).boot(Path(sys.argv[3]))
    print(machine.pid, flush=True)
    sys.stdin.read()
    """
)


def test_sigkill_of_the_owner_then_sweep_leaves_nothing_and_spares_live_peers(executor, workspace, state_dir):
    with executor.boot(workspace) as peer:
        owner = subprocess.Popen(
            [sys.executable, "-c", OWNER, str(REPO), str(state_dir), str(workspace)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            qemu_pid = int(owner.stdout.readline())
            pidfd = os.pidfd_open(qemu_pid)
        finally:
            owner.kill()
            owner.wait()
            owner.stdin.close()
            owner.stdout.close()
        try:
            # PDEATHSIG: the orphaned QEMU dies with its owner.
            assert select.select([pidfd], [], [], 30)[0], "QEMU outlived its SIGKILLed owner"
        finally:
            os.close(pidfd)
        leftovers = [p for p in fork_files(state_dir) if f"-{owner.pid}-" in p.name]
        assert leftovers, "expected the killed owner's fork files to be left for the sweep"
        removed = sweep_vms(state_dir)
        assert [str(p) for p in leftovers] == [r for r in removed if "fork-" in r]
        assert fork_files(state_dir) == [state_dir / "vm" / peer.name]
        assert run(peer, "echo peer alive")[1] == "peer alive\n"
    assert fork_files(state_dir) == []
    assert processes_using(state_dir) == []


def test_auto_uses_qemu_only_when_the_pipelines_image_is_built(state_dir, tmp_path):
    logs: list[str] = []
    chosen = choose_executor(load_settings({}, STATE_DIR=state_dir), logs.append, image="tiny")
    assert chosen.name == "qemu" and "tiny image" in logs[-1] and ("tcg" in logs[-1] or "kvm" in logs[-1])
    # Only tiny is built: a real recipe's pipeline (image docker, the default) must not be sent
    # to a machine that has no Docker.
    only_tiny = tmp_path / "only-tiny"
    (only_tiny / "images").mkdir(parents=True)
    tiny = state_dir / "images" / "tiny.json"
    (only_tiny / "images" / "tiny.json").write_text(tiny.read_text())
    digest = json.loads(tiny.read_text())["hash"]
    (only_tiny / "images" / digest).symlink_to((state_dir / "images" / digest).resolve())
    chosen = choose_executor(load_settings({}, STATE_DIR=only_tiny), logs.append)
    assert chosen.name != "qemu" and "the 'docker' guest image is not built" in logs[-1]
    chosen = choose_executor(load_settings({}, STATE_DIR=tmp_path / "no-images"), logs.append, image="tiny")
    assert chosen.name != "qemu" and "not built" in logs[-1]
    chosen = choose_executor(load_settings({}, STATE_DIR=state_dir), logs.append, image="abra-debian")
    assert chosen.name != "qemu" and "which this ccci does not build (it builds tiny, docker)" in logs[-1]
