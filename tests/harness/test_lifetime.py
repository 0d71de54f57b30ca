"""The lifetime guard in real processes: signals, the deadline, the parent's death, teardown."""

from __future__ import annotations

import os
import signal

from ccci.pids import process_start_time
from tests.harness.procs import wait_gone


def test_sigterm_runs_the_finally_block_and_exits_143(helpers, tmp_path):
    marker = tmp_path / "marker"
    run = helpers.start("guard", "--marker", str(marker))
    run.expect("ready")
    os.kill(run.pid, signal.SIGTERM)
    run.expect("interrupted canceled")
    assert run.wait() == 143
    assert marker.read_text() == "teardown done: canceled SIGTERM"


def test_a_signal_landing_while_the_run_polls_its_stop_is_never_lost(helpers, tmp_path):
    # A run that polls its stop (the app-lock wait, the scheduler) is inside the stop's Event,
    # holding its lock, when most signals land. A handler that took that lock again in the same
    # thread hung the run for good; eight runs signalled mid-poll each end canceled, promptly.
    runs = [helpers.start("guard", "--poll", "--marker", str(tmp_path / f"marker-{i}")) for i in range(8)]
    for run in runs:
        run.expect("ready")
    for run in runs:
        os.kill(run.pid, signal.SIGTERM)
    for i, run in enumerate(runs):
        run.expect("interrupted canceled")
        assert run.wait() == 143
        assert (tmp_path / f"marker-{i}").read_text() == "teardown done: canceled SIGTERM"


def test_sigint_exits_130_as_canceled(helpers, tmp_path):
    marker = tmp_path / "marker"
    run = helpers.start("guard", "--marker", str(marker))
    run.expect("ready")
    os.kill(run.pid, signal.SIGINT)
    assert run.wait() == 130
    assert marker.read_text() == "teardown done: canceled SIGINT"


def test_deadline_alarm_runs_the_finally_block_and_exits_142(helpers, tmp_path):
    marker = tmp_path / "marker"
    run = helpers.start("guard", "--deadline", "0.3", "--marker", str(marker))
    run.expect("ready")
    run.expect("log run interrupted: the run's deadline of 0.3s passed")
    assert run.wait() == 142
    assert marker.read_text() == "teardown done: timed_out SIGALRM"


def test_a_second_signal_during_teardown_does_not_cut_it_short(helpers, tmp_path):
    marker = tmp_path / "marker"
    run = helpers.start("guard", "--teardown-wait", "--marker", str(marker))
    run.expect("ready")
    os.kill(run.pid, signal.SIGTERM)
    run.expect("teardown-begins")
    os.kill(run.pid, signal.SIGTERM)
    run.expect("log SIGTERM during teardown")
    os.kill(run.pid, signal.SIGINT)
    run.expect("log SIGINT during teardown")
    run.send("finish")
    run.expect("teardown-done canceled")
    assert run.wait() == 143  # the first signal decides
    assert marker.read_text() == "teardown done: canceled SIGTERM,SIGTERM,SIGINT"


def test_a_signal_after_a_normal_finish_is_recorded_not_raised(helpers, tmp_path):
    marker = tmp_path / "marker"
    run = helpers.start("guard", "--finish-on-line", "--teardown-wait", "--marker", str(marker))
    run.expect("ready")
    run.send("done")  # the body ends normally
    run.expect("teardown-begins")
    os.kill(run.pid, signal.SIGTERM)
    run.expect("log SIGTERM during teardown")
    run.send("finish")
    run.expect("teardown-done canceled")
    assert run.wait() == 143  # the cancel still shows in the exit code
    assert marker.read_text() == "teardown done: canceled SIGTERM"


def test_the_run_is_its_own_session_so_canceling_the_group_reaches_children(helpers, tmp_path):
    run = helpers.start("guard", "--child", "--marker", str(tmp_path / "marker"))
    child = int(run.expect("child").split()[1])
    pid, sid, pgid = map(int, run.expect("ready").split()[1:])
    assert pid == sid == pgid == run.pid
    assert os.getpgid(child) == pgid
    os.killpg(pgid, signal.SIGTERM)
    assert run.expect("child-ended") == f"child-ended {-signal.SIGTERM}"
    assert run.wait() == 143


def test_a_process_group_leader_keeps_its_group(helpers, tmp_path):
    # What an interactive shell's job looks like: Ctrl-C from the terminal must still reach it.
    run = helpers.start("guard", "--marker", str(tmp_path / "marker"), process_group=0)
    pid, sid, pgid = map(int, run.expect("ready").split()[1:])
    assert pgid == pid and sid != pid
    os.kill(pid, signal.SIGTERM)
    assert run.wait() == 143


def test_the_parents_death_reaches_the_child_and_its_teardown_runs(helpers, tmp_path):
    marker = tmp_path / "marker"
    parent = helpers.start("spawn-guarded", "--marker", str(marker))
    child = int(parent.expect("child").split()[1])
    child_started = process_start_time(child)
    parent.expect("ready")
    os.kill(parent.pid, signal.SIGKILL)
    assert parent.wait() == -signal.SIGKILL
    parent.expect("interrupted canceled")  # the grandchild shares the pipe, it speaks on
    parent.expect("teardown-done canceled")
    parent.read_all()  # EOF: the grandchild has exited too
    assert marker.read_text() == "teardown done: canceled SIGTERM"
    wait_gone(child, child_started)


def test_a_parent_dead_before_the_guard_is_installed_is_caught_by_the_recheck(helpers, tmp_path):
    marker = tmp_path / "marker"
    parent = helpers.start("spawn-guarded", "--wait-go", "--marker", str(marker))
    parent.expect("child")
    parent.expect("waiting-go")
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()  # reaped, so the grandchild has been reparented already
    parent.send("go")  # the grandchild inherited this stdin
    line = parent.expect("interrupted-before-start")
    assert line.startswith("interrupted-before-start canceled the parent process")
    parent.read_all()
    assert marker.read_text() == "not started: canceled"
