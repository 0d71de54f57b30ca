"""App locks with real flocks held by real processes: waiting, reaping, races, flags."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from ccci.harness import applock
from ccci.harness.applock import (
    AppBusy,
    LockHolder,
    acquire_app_lock,
    list_locks,
    lock_path,
    probe_and_reap,
)
from tests.harness.procs import expect_any

APP = "demo.ci.localhost"


def reap_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plant_dead_lock(lock_dir, domain: str, run_id: str) -> None:
    """Leave what a holder killed mid-run leaves: the file with its JSON, and no flock."""
    holder = LockHolder(domain, run_id, "demo", 999_999_999, None, 1.0)
    lock_path(lock_dir, domain).write_text(json.dumps(holder.__dict__))


def never_reap(holder: LockHolder) -> None:
    raise AssertionError(f"reaped {holder}")


class Recorder(list):
    """A reap callback that records, for probe_and_reap (which logs and survives reap errors)."""

    def __call__(self, holder: LockHolder) -> None:
        self.append(holder)


def test_a_held_lock_makes_the_second_run_wait_and_the_first_finish_unharmed(helpers, lock_dir):
    first = helpers.start("hold-lock", str(lock_dir), APP, "run-a")
    first.expect("ready")
    second = helpers.start("hold-lock", str(lock_dir), APP, "run-b", "--wait", "60")
    second.expect("waiting run-a")  # on_wait names the holder
    [info] = list_locks(lock_dir, leak_after=3600)
    assert info.held and info.holder.run_id == "run-a" and not info.possible_leak
    first.send("release")
    first.expect("released")
    assert first.wait() == 0
    _, held_ino, path_ino = second.expect("ready").split()
    assert held_ino == path_ino
    assert list_locks(lock_dir, 3600)[0].holder.run_id == "run-b"
    second.send("release")
    assert second.wait() == 0
    assert list(lock_dir.iterdir()) == []  # a clean release leaves nothing behind


def test_on_wait_reports_the_holder_again_when_it_changes(helpers, lock_dir):
    holder = helpers.start("hold-lock", str(lock_dir), APP, "run-a")
    holder.expect("ready")
    b = helpers.start("hold-lock", str(lock_dir), APP, "run-b")
    c = helpers.start("hold-lock", str(lock_dir), APP, "run-c")
    b.expect("waiting run-a")
    c.expect("waiting run-a")
    holder.send("release")
    winner = expect_any([b, c], "ready")
    loser, name = (c, "run-b") if winner is b else (b, "run-c")
    loser.expect(f"waiting {name}")
    winner.send("release")
    loser.expect("ready")
    loser.send("release")
    assert [h.wait() for h in (holder, b, c)] == [0, 0, 0]


def test_sigkill_of_the_holder_is_reaped_once_and_the_waiter_takes_a_fresh_inode(helpers, lock_dir, tmp_path):
    log = tmp_path / "reaps"
    holder = helpers.start("hold-lock", str(lock_dir), APP, "run-a")
    old_ino = int(holder.expect("ready").split()[1])
    pinned = os.open(lock_path(lock_dir, APP), os.O_RDONLY)  # keeps the old inode number taken
    try:
        waiter = helpers.start("hold-lock", str(lock_dir), APP, "run-b", "--reap-log", str(log))
        waiter.expect("waiting run-a")
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        waiter.expect("reaping run-a")
        _, held_ino, path_ino = waiter.expect("ready").split()
        assert held_ino == path_ino != str(old_ino)
        assert os.fstat(pinned).st_nlink == 0  # the dead run's file is gone from the directory
    finally:
        os.close(pinned)
    assert reap_log(log) == [{"run": "run-a", "by": waiter.pid}]
    waiter.send("release")
    assert waiter.wait() == 0


def test_two_janitor_processes_at_once_reap_exactly_once(helpers, lock_dir, tmp_path):
    log = tmp_path / "reaps"
    holder = helpers.start("hold-lock", str(lock_dir), APP, "run-a")
    holder.expect("ready")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    janitors = [helpers.start("janitor", str(lock_dir), "--reap-log", str(log), "--reap-gate") for _ in "12"]
    reaper = expect_any(janitors, "reaping run-a")
    [other] = [j for j in janitors if j is not reaper]
    other.expect("reaped 0")  # it ran while the reaper held the lock mid-reap
    assert other.wait() == 0
    reaper.send("go")
    reaper.expect("reaped 1")
    assert reaper.wait() == 0
    assert reap_log(log) == [{"run": "run-a", "by": reaper.pid}]
    assert list(lock_dir.iterdir()) == []


def test_two_janitor_processes_racing_over_many_dead_locks_reap_each_once(helpers, lock_dir, tmp_path):
    log = tmp_path / "reaps"
    domains = [f"app{i}.ci.localhost" for i in range(12)]
    for i, domain in enumerate(domains):
        plant_dead_lock(lock_dir, domain, f"run-{i}")
    janitors = [helpers.start("janitor", str(lock_dir), "--reap-log", str(log)) for _ in "12"]
    counts = [int(j.expect("reaped").split()[1]) for j in janitors]
    assert [j.wait() for j in janitors] == [0, 0]
    assert sum(counts) == len(domains)
    assert sorted(r["run"] for r in reap_log(log)) == sorted(f"run-{i}" for i in range(12))
    assert list(lock_dir.iterdir()) == []


def test_the_unlink_recreate_race_leaves_the_waiter_on_the_fresh_inode(helpers, lock_dir, tmp_path):
    log = tmp_path / "reaps"
    holder = helpers.start("hold-lock", str(lock_dir), APP, "run-a")
    old_ino = int(holder.expect("ready").split()[1])
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    pinned = os.open(lock_path(lock_dir, APP), os.O_RDONLY)
    try:
        janitor = helpers.start("janitor", str(lock_dir), "--reap-log", str(log), "--reap-gate")
        janitor.expect("reaping run-a")  # the reaper holds the dead run's lock
        waiter = helpers.start("hold-lock", str(lock_dir), APP, "run-b", "--reap-log", str(log))
        waiter.expect("waiting run-a")  # blocked behind the reaper
        janitor.send("go")  # the reaper unlinks and releases while the waiter polls
        janitor.expect("reaped 1")
        _, held_ino, path_ino = waiter.expect("ready").split()
        assert held_ino == path_ino != str(old_ino)
        assert os.fstat(pinned).st_nlink == 0
    finally:
        os.close(pinned)
    assert reap_log(log) == [{"run": "run-a", "by": janitor.pid}]
    waiter.send("release")
    assert waiter.wait() == 0


def test_a_waiter_that_wins_a_removed_inode_retries_on_the_fresh_file(lock_dir, monkeypatch):
    first = acquire_app_lock(lock_dir, APP, LockHolder(APP, "run-a"), wait=0, reap=never_reap)
    realtry_flock = applock.try_flock
    stale = []

    def release_between_open_and_flock(fd, kind=applock.fcntl.LOCK_EX):
        if first.fd is not None:  # the waiter has opened the old file; now the holder leaves
            stale.append(os.fstat(fd).st_ino)
            first()
        return realtry_flock(fd, kind)

    monkeypatch.setattr(applock, "try_flock", release_between_open_and_flock)
    second = acquire_app_lock(lock_dir, APP, LockHolder(APP, "run-b"), wait=0, reap=never_reap)
    try:
        assert os.fstat(second.fd).st_ino == os.stat(second.path).st_ino
        assert len(stale) == 1 and os.fstat(second.fd).st_nlink == 1
    finally:
        second()


def test_a_reaper_that_wins_a_removed_inode_leaves_it_alone(lock_dir, monkeypatch):
    plant_dead_lock(lock_dir, APP, "run-a")
    realtry_flock = applock.try_flock
    reaps = []
    armed = [True]

    def other_janitor_reaps_first(fd, kind=applock.fcntl.LOCK_EX):
        if armed.pop() if armed else False:
            reaps.append(("other", probe_and_reap(lock_dir, lambda h: None)))
        return realtry_flock(fd, kind)

    monkeypatch.setattr(applock, "try_flock", other_janitor_reaps_first)
    recorded = Recorder()
    assert probe_and_reap(lock_dir, recorded) == []
    assert recorded == []
    assert [(who, [h.run_id for h in hs]) for who, hs in reaps] == [("other", ["run-a"])]


def test_runs_of_different_apps_hold_their_locks_at_the_same_time(helpers, lock_dir):
    a = helpers.start("hold-lock", str(lock_dir), "a.ci.localhost", "run-a", "--wait", "0")
    b = helpers.start("hold-lock", str(lock_dir), "b.ci.localhost", "run-b", "--wait", "0")
    a.expect("ready")
    b.expect("ready")  # neither has released: both hold at once, neither waited
    assert [(i.app_domain, i.held) for i in list_locks(lock_dir, 3600)] == [
        ("a.ci.localhost", True),
        ("b.ci.localhost", True),
    ]
    for h in (a, b):
        h.send("release")
        assert h.wait() == 0


def test_the_wait_limit_ends_in_app_busy_naming_the_holder(helpers, lock_dir):
    holder = helpers.start("hold-lock", str(lock_dir), APP, "run-41")
    holder.expect("ready")
    waiter = helpers.start("hold-lock", str(lock_dir), APP, "run-42", "--wait", "0.3")
    waiter.expect("waiting run-41")
    message = waiter.expect("busy ")
    assert waiter.wait() == 3
    assert f"{APP} is busy: run run-41 (demo) has held it since 20" in message
    assert message.endswith("Comment !testme again once run run-41 has finished.")
    [info] = list_locks(lock_dir, 3600)
    assert info.held and info.holder.run_id == "run-41"  # the holder is unharmed
    holder.send("release")
    assert holder.wait() == 0


def test_app_busy_reads_as_a_sentence_with_the_configured_trigger():
    holder = LockHolder(APP, "7", "demo", 1, None, 0.0)
    message = str(AppBusy(APP, holder, 1800, trigger="!ci"))
    assert message == (
        f"{APP} is busy: run 7 (demo) has held it since 1970-01-01 00:00:00 UTC, and this run gave up "
        "after waiting 30 min. Comment !ci again once run 7 has finished."
    )


def test_sigterm_interrupts_the_wait_promptly(helpers, lock_dir):
    holder = helpers.start("hold-lock", str(lock_dir), APP, "run-a")
    holder.expect("ready")
    waiter = helpers.start("hold-lock", str(lock_dir), APP, "run-b", "--wait", "600", "--guard")
    waiter.expect("waiting run-a")
    os.kill(waiter.pid, signal.SIGTERM)
    waiter.expect("interrupted canceled")
    assert waiter.wait(timeout=5) == 143
    [info] = list_locks(lock_dir, 3600)
    assert info.held and info.holder.run_id == "run-a"
    holder.send("release")
    assert holder.wait() == 0


def test_a_live_holder_is_never_reaped(helpers, lock_dir):
    holder = helpers.start("hold-lock", str(lock_dir), APP, "run-a")
    holder.expect("ready")
    recorded = Recorder()
    assert probe_and_reap(lock_dir, recorded) == []
    assert probe_and_reap(lock_dir, recorded, app_domain=APP) == []
    assert recorded == []
    with pytest.raises(AppBusy):
        acquire_app_lock(lock_dir, APP, LockHolder(APP, "run-b"), wait=0, reap=never_reap)
    holder.send("release")
    holder.expect("released")
    assert holder.wait() == 0


def test_a_lock_held_past_leak_after_is_flagged_not_stolen(helpers, lock_dir, caplog):
    holder = helpers.start("hold-lock", str(lock_dir), APP, "run-a")
    holder.expect("ready")
    [info] = list_locks(lock_dir, leak_after=0)
    assert info.held and info.possible_leak and info.reason.startswith("held for")
    assert info.holder.run_id == "run-a" and info.age > 0
    assert not list_locks(lock_dir, leak_after=3600)[0].possible_leak
    recorded = Recorder()
    assert probe_and_reap(lock_dir, recorded) == [] and recorded == []
    assert list_locks(lock_dir, leak_after=0)[0].held
    holder.send("release")
    holder.expect("released")
    assert holder.wait() == 0


def test_a_held_lock_whose_holder_process_is_gone_is_flagged(lock_dir):
    # The lock is held by this test (standing in for a child that inherited the fd) while the
    # JSON names a process that no longer exists.
    lock = acquire_app_lock(lock_dir, APP, LockHolder(APP, "run-a", "demo", 999_999_999), wait=0, reap=never_reap)
    try:
        [info] = list_locks(lock_dir, leak_after=3600)
        assert info.held and info.possible_leak and "999999999 is gone" in info.reason
    finally:
        lock()


def test_a_dead_holders_lock_is_listed_unheld_and_reaped_once(lock_dir):
    plant_dead_lock(lock_dir, APP, "run-a")
    [info] = list_locks(lock_dir, leak_after=0)
    assert not info.held and not info.possible_leak and info.holder.run_id == "run-a"
    reaped: list[LockHolder] = []
    assert [h.run_id for h in probe_and_reap(lock_dir, reaped.append)] == ["run-a"]
    assert [h.run_id for h in reaped] == ["run-a"]
    assert probe_and_reap(lock_dir, reaped.append) == []
    assert len(reaped) == 1
    assert list(lock_dir.iterdir()) == []


def test_a_failed_reap_keeps_the_lock_for_the_next_sweep(lock_dir):
    plant_dead_lock(lock_dir, APP, "run-a")

    def broken(holder):
        raise RuntimeError("abra is down")

    assert probe_and_reap(lock_dir, broken) == []
    assert lock_path(lock_dir, APP).exists()
    assert [h.run_id for h in probe_and_reap(lock_dir, lambda h: None)] == ["run-a"]


def test_a_lock_file_without_a_holder_is_removed_without_a_reap(lock_dir):
    lock_path(lock_dir, APP).touch()  # a holder died between flock and writing its JSON
    recorded = Recorder()
    assert probe_and_reap(lock_dir, recorded) == [] and recorded == []
    assert list(lock_dir.iterdir()) == []


def test_release_is_idempotent_and_bad_domains_are_refused(lock_dir):
    lock = acquire_app_lock(lock_dir, APP, LockHolder(APP, "run-a"), wait=0, reap=never_reap)
    lock()
    lock()
    assert list(lock_dir.iterdir()) == []
    for bad in ("../etc", "Demo.localhost", "a/b", ""):
        with pytest.raises(ValueError):
            lock_path(lock_dir, bad)


def test_threads_of_one_process_exclude_each_other(lock_dir):
    # flock belongs to the open file description, so even two threads cannot share an app.
    held = acquire_app_lock(lock_dir, APP, LockHolder(APP, "run-a"), wait=0, reap=never_reap)
    seen = []
    waiting, got_it = threading.Event(), threading.Event()

    def on_wait(holder):
        seen.append(holder)
        waiting.set()

    def waiter():
        lock = acquire_app_lock(lock_dir, APP, LockHolder(APP, "run-b"), wait=30, reap=never_reap, on_wait=on_wait)
        got_it.set()
        lock()

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        assert waiting.wait(30)
        assert not got_it.is_set()
    finally:
        held()
        thread.join(30)
    assert got_it.is_set() and [h.run_id for h in seen] == ["run-a"]
