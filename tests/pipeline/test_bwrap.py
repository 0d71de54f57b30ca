"""BwrapExecutor with real processes: output, exit codes, env, timeouts, cancel, leftovers."""

import os
import threading

import pytest
from pipeline_helpers import alive, read_pid, wait_for

from ccci.errors import PermanentInfraError
from ccci.pipeline.executor import TIMEOUT_EXIT, ExecRequest
from ccci.vm.bwrap import BwrapExecutor, bwrap_usable


@pytest.fixture
def machine(tmp_path):
    m = BwrapExecutor(use_bwrap=False, grace=0.5).boot(tmp_path)
    yield m
    m.close()


def collect():
    out = {"stdout": b"", "stderr": b""}

    def sink(stream, chunk):
        out[stream] += chunk

    return out, sink


def test_runs_in_the_workspace_with_a_clean_env_and_streams_output(machine, tmp_path, monkeypatch):
    monkeypatch.setenv("CCCI_FORGE_TOKEN", "must-not-leak-into-steps")
    (tmp_path / "marker").write_text("here")
    out, sink = collect()
    cmd = 'cat marker; echo " $FOO"; echo err >&2; env | grep -c CCCI_ || true; exit 3'
    result = machine.exec(ExecRequest(cmd, env={"FOO": "bar"}, on_output=sink))
    assert result.exit_code == 3 and not result.timed_out and not result.canceled
    assert out["stdout"] == b"here bar\n0\n" and out["stderr"] == b"err\n"


def test_timeout_kills_the_whole_group_and_exits_124(machine, tmp_path):
    pidfile = tmp_path / "child.pid"
    cmd = f"sleep 300 & echo $! > {pidfile}; trap '' TERM; wait"  # the shell even ignores TERM
    result = machine.exec(ExecRequest(cmd, timeout=0.5))
    assert result.exit_code == TIMEOUT_EXIT and result.timed_out
    child = read_pid(pidfile)
    assert child
    wait_for(lambda: not alive(child), what="the child's death")  # SIGKILL lands asynchronously


def test_cancel_kills_the_step_and_its_children(machine, tmp_path):
    pidfile = tmp_path / "child.pid"
    request = ExecRequest(f"sh -c 'sleep 300 & echo $! > {pidfile}; wait'")
    results = []
    worker = threading.Thread(target=lambda: results.append(machine.exec(request)))
    worker.start()
    child = wait_for(lambda: read_pid(pidfile), what="the step's child")
    assert alive(child)
    request.cancel.set()
    worker.join(10)
    assert results and results[0].canceled and results[0].exit_code != 0
    wait_for(lambda: not alive(child), what="the child's death")


def test_background_processes_do_not_outlive_their_step(machine, tmp_path):
    pidfile = tmp_path / "bg.pid"
    result = machine.exec(ExecRequest(f"sleep 300 & echo $! > {pidfile}; exit 0"))
    assert result.exit_code == 0
    pid = read_pid(pidfile)
    wait_for(lambda: not alive(pid), what="the background child's death")


def test_close_kills_running_steps_and_refuses_new_ones(machine, tmp_path):
    pidfile = tmp_path / "child.pid"
    results = []
    worker = threading.Thread(
        target=lambda: results.append(machine.exec(ExecRequest(f"sleep 300 & echo $! > {pidfile}; wait")))
    )
    worker.start()
    child = wait_for(lambda: read_pid(pidfile), what="the step's child")
    machine.close()
    worker.join(10)
    assert results[0].canceled
    wait_for(lambda: not alive(child), what="the child's death")
    with pytest.raises(PermanentInfraError):
        machine.exec(ExecRequest("true"))


def test_forks_share_the_workspace(machine, tmp_path):
    machine.exec(ExecRequest("echo state > file"))
    checkpoint = machine.checkpoint()
    fork = checkpoint.fork()
    try:
        out, sink = collect()
        assert fork.exec(ExecRequest("cat file", on_output=sink)).exit_code == 0
        assert out["stdout"] == b"state\n" and fork.name != machine.name
    finally:
        fork.close()
        checkpoint.close()
    assert BwrapExecutor(use_bwrap=False).isolated_forks is False


def test_boot_refuses_a_missing_workspace(tmp_path):
    with pytest.raises(PermanentInfraError):
        BwrapExecutor(use_bwrap=False).boot(tmp_path / "nope")


@pytest.mark.skipif(not bwrap_usable(), reason="bubblewrap cannot create namespaces here")
def test_bwrap_sandbox_has_a_read_only_root_and_a_writable_workspace(tmp_path):
    machine = BwrapExecutor(use_bwrap=True, grace=0.5).boot(tmp_path)
    try:
        out, sink = collect()
        cmd = "touch /usr/ccci-test 2>/dev/null && echo rootrw; echo ok > here; cat here; echo $$"
        assert machine.exec(ExecRequest(cmd, on_output=sink)).exit_code == 0
        assert out["stdout"].split(b"\n")[:2] == [b"ok", b"2"]  # sh is pid 2 in its own namespace
        assert (tmp_path / "here").read_text() == "ok\n" and not os.path.exists("/usr/ccci-test")
        assert machine.exec(ExecRequest("sleep 300 & wait", timeout=0.3)).timed_out
    finally:
        machine.close()
