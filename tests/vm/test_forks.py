"""Forks of a warm base: running commands, streaming, isolation, fan-out, timeouts, cancel."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ccci.pipeline.executor import TIMEOUT_EXIT, ExecRequest
from ccci.vm.image import build_image
from tests.vm.vmhelpers import fork_files, run, sha256

pytestmark = pytest.mark.vm


def test_image_rebuild_with_same_inputs_is_a_cache_hit(vm_cache):
    first = build_image("tiny", vm_cache, progress=lambda _m: None)
    again = build_image("tiny", vm_cache, progress=lambda _m: None)
    assert again.cached and again.hash == first.hash
    assert again.kernel.read_bytes()[:4] == b"\x7fELF"


def test_a_fork_runs_steps_in_the_workspace_at_the_same_path(executor, workspace):
    with executor.boot(workspace) as machine:
        result, out, err = run(machine, 'pwd; ./tests/smoke.sh; echo "$RECIPE" >&2; exit 3', env={"RECIPE": "hello"})
        assert (result.exit_code, result.timed_out, result.canceled) == (3, False, False)
        assert out == f"{workspace}\nsmoke ok\n"
        assert err == "hello\n"
        # Restored forks get the host's clock and their own hostname before the first step.
        _, out, _ = run(machine, "date +%s; hostname")
        guest_time, hostname = out.split()
        assert abs(int(guest_time) - time.time()) < 30
        assert hostname == machine.name
        assert machine.log_path is not None and machine.log_path.exists()


def test_output_streams_while_the_command_runs_and_exec_is_concurrent(executor, workspace):
    started = threading.Event()

    def sink(stream, chunk):
        if b"waiting" in chunk:
            started.set()

    with executor.boot(workspace) as machine, ThreadPoolExecutor(1) as pool:
        # The first command only finishes once a second, concurrent command releases it,
        # which it can only do after the first one's early output has reached the host.
        waiting = pool.submit(
            machine.exec,
            ExecRequest("echo waiting; while [ ! -e /tmp/go ]; do usleep 10000; done; echo released",
                        on_output=sink, timeout=60),
        )  # fmt: skip
        assert started.wait(30), "no output arrived while the command was running"
        assert not waiting.done()
        assert run(machine, "touch /tmp/go")[0].exit_code == 0
        assert waiting.result(timeout=60).exit_code == 0


def test_forks_are_isolated_from_each_other_and_from_the_base(executor, workspace, state_dir):
    base = executor.warm_base()
    mem_before = sha256(base.mem)
    with executor.boot(workspace) as a, executor.boot(workspace) as b:
        write = "echo {0} > /tmp/mark; echo {0} > compose.yml; echo {0} > /var/lib/ccci/mark; sync"
        assert run(a, write.format("from-a"))[0].exit_code == 0
        assert run(b, write.format("from-b"))[0].exit_code == 0
        _, out_a, _ = run(a, "cat /tmp/mark compose.yml /var/lib/ccci/mark")
        _, out_b, _ = run(b, "echo 3 > /proc/sys/vm/drop_caches; cat /tmp/mark compose.yml /var/lib/ccci/mark")
        assert out_a == "from-a\n" * 3
        assert out_b == "from-b\n" * 3
        assert a.name != b.name
    with executor.boot(workspace) as fresh:
        _, out, _ = run(fresh, "cat /tmp/mark /var/lib/ccci/mark 2>&1; cat compose.yml")
        assert "from-" not in out and "version: '3.8'" in out
    assert sha256(base.mem) == mem_before
    assert fork_files(state_dir) == []


def test_parallel_fan_out_of_several_forks_from_one_base(executor, workspace, state_dir):
    executor.warm_base()

    def one(i: int) -> str:
        with executor.boot(workspace) as machine:
            result, out, _ = run(machine, f"echo fork {i} $(hostname)")
            assert result.exit_code == 0
            return out

    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(one, range(4)))
    assert [o.split()[:2] for o in outputs] == [["fork", str(i)] for i in range(4)]
    assert len({o.split()[2] for o in outputs}) == 4  # four distinct machines
    assert fork_files(state_dir) == []


def test_a_timeout_kills_the_hung_command_and_the_machine_stays_usable(executor, workspace):
    with executor.boot(workspace) as machine:
        started = time.monotonic()
        result, out, _ = run(machine, "echo before; sleep 1000; echo after", timeout=1.0)
        assert (result.exit_code, result.timed_out) == (TIMEOUT_EXIT, True)
        assert out == "before\n"
        assert time.monotonic() - started < 15
        _, out, _ = run(machine, "ps -o pid,args | grep -c '[s]leep 1000'; echo alive")
        assert out.split() == ["0", "alive"]


def test_cancel_stops_a_step_midway(executor, workspace):
    cancel = threading.Event()

    def sink(stream, chunk):
        if b"running" in chunk:
            cancel.set()

    with executor.boot(workspace) as machine:
        result = machine.exec(ExecRequest("echo running; sleep 1000", on_output=sink, cancel=cancel, timeout=120))
        assert result.canceled and not result.timed_out
        assert result.exit_code == 128 + 9
        assert run(machine, "echo still here")[1] == "still here\n"
