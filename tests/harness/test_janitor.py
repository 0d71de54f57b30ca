"""The janitor over real processes: what it reaps, removes and flags, and what it never touches."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal

from ccci.harness.abradir import OWNER
from ccci.harness.applock import LockHolder, lock_path
from ccci.harness.janitor import Janitor

APP = "demo.ci.localhost"


def make_janitor(tmp_path, lock_dir, reaped, **kwargs) -> Janitor:
    return Janitor(tmp_path / "runs", lock_dir, leak_after=3600, reap_app=reaped.append, **kwargs)


def test_quick_reaps_a_killed_holders_app_once_and_leaves_a_live_one(helpers, lock_dir, tmp_path):
    live = helpers.start("hold-lock", str(lock_dir), "live.ci.localhost", "run-live")
    dead = helpers.start("hold-lock", str(lock_dir), APP, "run-dead")
    live.expect("ready")
    dead.expect("ready")
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    reaped: list[LockHolder] = []
    janitor = make_janitor(tmp_path, lock_dir, reaped)
    report = janitor.quick()
    assert [(h.app_domain, h.run_id, h.recipe, h.pid) for h in reaped] == [(APP, "run-dead", "demo", dead.pid)]
    assert report.reaped_apps == reaped and report.errors == [] and report.flagged == []
    assert not lock_path(lock_dir, APP).exists()
    assert janitor.quick().reaped_apps == [] and len(reaped) == 1
    [info] = janitor.locks()
    assert info.held and info.holder.run_id == "run-live"
    live.send("release")
    assert live.wait() == 0


def test_thorough_removes_dead_abra_dirs_and_runs_every_sweeper(helpers, lock_dir, tmp_path):
    runs, home = tmp_path / "runs", tmp_path / "home"
    (home / "servers").mkdir(parents=True)
    live = helpers.start("abradir", str(runs / "1"), str(home), "demo")
    dead = helpers.start("abradir", str(runs / "2"), str(home), "demo")
    live.expect("ready")
    dead.expect("ready")
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()

    def sweep_vms(state_dir):
        return [state_dir / "fork-1.qcow2"]

    def broken():
        raise RuntimeError("qemu-img missing")

    reaped: list[LockHolder] = []
    janitor = make_janitor(
        tmp_path, lock_dir, reaped, extra_sweepers=[functools.partial(sweep_vms, tmp_path), broken, lambda: ["x"]]
    )
    report = janitor.thorough()
    assert report.removed_abra_dirs == [runs / "2" / "abra"]
    assert not (runs / "2" / OWNER).exists() and (runs / "1" / "abra").is_dir()
    assert report.swept == {"sweep_vms": [tmp_path / "fork-1.qcow2"], "sweeper-3": ["x"]}
    assert report.errors == ["broken: qemu-img missing"]
    data = report.to_dict()
    assert json.loads(json.dumps(data))["removed_abra_dirs"] == [str(runs / "2" / "abra")]
    assert "removed 1 ABRA_DIR(s) and 2 other leftover(s)" in report.summary()
    live.send("leave")
    assert live.wait() == 0


def test_a_long_held_lock_is_flagged_and_logged_never_stolen(helpers, lock_dir, tmp_path, caplog):
    holder = helpers.start("hold-lock", str(lock_dir), APP, "run-a")
    holder.expect("ready")
    reaped: list[LockHolder] = []
    janitor = Janitor(tmp_path / "runs", lock_dir, leak_after=0, reap_app=reaped.append)
    with caplog.at_level(logging.WARNING, logger="ccci.harness.janitor"):
        report = janitor.thorough()
    assert reaped == [] and report.reaped_apps == []
    [flag] = report.flagged
    assert flag.app_domain == APP and flag.holder.run_id == "run-a" and flag.age > 0
    assert report.to_dict()["flagged"][0]["run"] == "run-a"
    [line] = [r for r in caplog.records if "possible leak" in r.getMessage()]
    assert line.run == "run-a" and f"possible leak: {APP} held by this run: held for" in line.getMessage()
    holder.send("release")
    holder.expect("released")  # the holder still owned its lock, untouched
    assert holder.wait() == 0


def test_a_failing_reap_is_reported_and_the_lock_kept(helpers, lock_dir, tmp_path):
    holder = helpers.start("hold-lock", str(lock_dir), APP, "run-a")
    holder.expect("ready")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()

    def reap_fails(holder):
        raise RuntimeError("abra: server unreachable")

    report = Janitor(tmp_path / "runs", lock_dir, leak_after=3600, reap_app=reap_fails).quick()
    assert report.reaped_apps == []
    assert report.errors == [f"reaping {APP} of run run-a: abra: server unreachable"]
    assert lock_path(lock_dir, APP).exists()
    reaped: list[LockHolder] = []
    assert [h.run_id for h in make_janitor(tmp_path, lock_dir, reaped).quick().reaped_apps] == ["run-a"]


def test_two_janitor_processes_sweeping_everything_at_once_free_each_thing_once(helpers, lock_dir, tmp_path):
    runs, home, log = tmp_path / "runs", tmp_path / "home", tmp_path / "reaps"
    home.mkdir()
    victims = [helpers.start("hold-lock", str(lock_dir), f"app{i}.ci.localhost", f"run-{i}") for i in range(4)]
    victims += [helpers.start("abradir", str(runs / str(i)), str(home), "demo") for i in range(4)]
    for victim in victims:
        victim.expect("ready")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    janitors = [helpers.start("janitor", str(lock_dir), "--runs-dir", str(runs), "--reap-log", str(log)) for _ in "12"]
    reports = [json.loads(j.expect("report").split(" ", 1)[1]) for j in janitors]
    assert [j.wait() for j in janitors] == [0, 0]
    reaped = sorted(h["run_id"] for r in reports for h in r["reaped_apps"])
    removed = sorted(p for r in reports for p in r["removed_abra_dirs"])
    assert reaped == [f"run-{i}" for i in range(4)]
    assert removed == sorted(str(runs / str(i) / "abra") for i in range(4))
    assert sorted(json.loads(line)["run"] for line in log.read_text().splitlines()) == reaped
    assert list(lock_dir.iterdir()) == []
    assert all(sorted(p.name for p in (runs / str(i)).iterdir()) == [] for i in range(4))
