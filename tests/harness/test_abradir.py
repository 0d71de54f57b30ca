"""The per-run ABRA_DIR: its tree, its removal on every path, and the sweep of dead owners'."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from ccci.errors import CcciError
from ccci.harness.abradir import OWNER, RunAbraDir, sweep_abra_dirs
from ccci.pipeline.stop import Stopped, StopRequest


@pytest.fixture
def abra_home(tmp_path: Path) -> Path:
    home = tmp_path / "abra-home"
    (home / "servers" / "ci.localhost").mkdir(parents=True)
    (home / "servers" / "ci.localhost" / "demo.ci.localhost.env").write_text("TYPE=demo\n")
    (home / "catalogue").mkdir()
    (home / "catalogue" / "recipes.json").write_text("{}")
    return home


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() if p.is_file() else "/" for p in sorted(root.rglob("*"))}


def test_the_tree_links_servers_and_catalogue_and_has_a_fresh_recipe_dir(tmp_path, abra_home):
    run_dir = tmp_path / "runs" / "17"
    with RunAbraDir(run_dir, abra_home, "demo") as box:
        assert box.abra_dir == run_dir / "abra" and box.recipe_dir == run_dir / "abra" / "recipes" / "demo"
        assert sorted(p.name for p in box.abra_dir.iterdir()) == ["catalogue", "recipes", "servers"]
        for name in ("servers", "catalogue"):
            link = box.abra_dir / name
            assert link.is_symlink() and link.resolve() == (abra_home / name).resolve()
        assert (box.abra_dir / "servers" / "ci.localhost" / "demo.ci.localhost.env").read_text() == "TYPE=demo\n"
        assert box.recipe_dir.is_dir() and list(box.recipe_dir.iterdir()) == []
        assert [p.name for p in (box.abra_dir / "recipes").iterdir()] == ["demo"]
        owner = json.loads((run_dir / OWNER).read_text())
        assert owner["run"] == "17" and owner["pid"] == os.getpid() and owner["pid_start"] > 0
        assert box.shared == ["servers", "catalogue"]


def test_leaving_removes_the_abra_dir_but_not_the_run_dir_nor_abra_home(tmp_path, abra_home):
    run_dir = tmp_path / "runs" / "17"
    before = snapshot(abra_home)
    with RunAbraDir(run_dir, abra_home, "demo") as box:
        (run_dir / "log").write_text("the run's log")
        (box.recipe_dir / "compose.yml").write_text("services: {}")
        (box.abra_dir / "servers" / "ci.localhost" / "other.env").write_text("x")  # through the link
        readonly = box.recipe_dir / ".git" / "objects"
        readonly.mkdir(parents=True)
        (readonly / "ab").write_text("blob")
        readonly.chmod(0o500)
    assert not box.abra_dir.exists() and not (run_dir / OWNER).exists()
    assert (run_dir / "log").read_text() == "the run's log"
    after = snapshot(abra_home)
    assert after.pop("servers/ci.localhost/other.env") == "x"  # written by a step, kept: it is shared
    assert after == before


def test_an_exception_removes_the_abra_dir(tmp_path, abra_home):
    with pytest.raises(ValueError), RunAbraDir(tmp_path / "run", abra_home, "demo") as box:
        raise ValueError("step crashed")
    assert not box.abra_dir.exists()
    assert snapshot(abra_home)["servers/ci.localhost/demo.ci.localhost.env"] == "TYPE=demo\n"


def test_run_interrupted_removes_the_abra_dir(tmp_path, abra_home):
    with pytest.raises(Stopped), RunAbraDir(tmp_path / "run", abra_home, "demo") as box:
        raise Stopped(StopRequest("canceled", 143, "SIGTERM received"))
    assert not box.abra_dir.exists()


def test_a_real_sigterm_removes_the_abra_dir(helpers, tmp_path, abra_home):
    run_dir = tmp_path / "run"
    run = helpers.start("abradir", str(run_dir), str(abra_home), "demo", "--guard")
    run.expect("ready")
    assert (run_dir / "abra" / "recipes" / "demo").is_dir()
    os.kill(run.pid, signal.SIGTERM)
    run.expect("interrupted canceled")
    assert run.wait() == 143
    assert not (run_dir / "abra").exists() and not (run_dir / OWNER).exists()


def test_keep_keeps_the_abra_dir_and_no_sweep_removes_it(tmp_path, abra_home):
    runs = tmp_path / "runs"
    with RunAbraDir(runs / "5", abra_home, "demo", keep=True) as box:
        (box.recipe_dir / "debug-me").write_text("x")
    assert (box.recipe_dir / "debug-me").read_text() == "x"
    assert json.loads((runs / "5" / OWNER).read_text())["kept"] is True
    assert sweep_abra_dirs(runs) == []
    assert (box.recipe_dir / "debug-me").exists()


def test_abra_home_is_never_written_and_missing_entries_are_not_linked(tmp_path):
    home = tmp_path / "abra-home"
    (home / "servers").mkdir(parents=True)
    with RunAbraDir(tmp_path / "a", home, "demo") as box:
        assert box.shared == ["servers"]
        assert not (box.abra_dir / "catalogue").exists() and not (box.abra_dir / "catalogue").is_symlink()
    assert sorted(p.name for p in home.iterdir()) == ["servers"]
    missing = tmp_path / "no-such-home"
    with RunAbraDir(tmp_path / "b", missing, "demo") as box:
        assert box.shared == [] and box.recipe_dir.is_dir()
    assert not missing.exists()


def test_a_retried_run_gets_a_fresh_recipe_dir(tmp_path, abra_home):
    run_dir = tmp_path / "run"
    stale = run_dir / "abra" / "recipes" / "demo"
    stale.mkdir(parents=True)
    (stale / "old-checkout").write_text("x")  # left by a dead owner of the same run dir
    with RunAbraDir(run_dir, abra_home, "demo") as box:
        assert list(box.recipe_dir.iterdir()) == []


def test_a_live_owners_abra_dir_cannot_be_entered_again(helpers, tmp_path, abra_home):
    run_dir = tmp_path / "run"
    owner = helpers.start("abradir", str(run_dir), str(abra_home), "demo")
    owner.expect("ready")
    with pytest.raises(CcciError, match="belongs to a live process"), RunAbraDir(run_dir, abra_home, "demo"):
        pass
    assert (run_dir / "abra" / "recipes" / "demo").is_dir()  # untouched
    owner.send("leave")
    owner.expect("left")
    assert owner.wait() == 0


def test_the_sweep_removes_a_dead_owners_abra_dir_and_never_a_live_ones(helpers, tmp_path, abra_home):
    runs = tmp_path / "runs"
    live = helpers.start("abradir", str(runs / "1"), str(abra_home), "demo")
    dead = helpers.start("abradir", str(runs / "2"), str(abra_home), "demo")
    live.expect("ready")
    dead.expect("ready")
    (runs / "2" / "report.json").write_text("{}")
    assert sweep_abra_dirs(runs) == []  # both alive
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    before = snapshot(abra_home)
    assert sweep_abra_dirs(runs) == [runs / "2" / "abra"]
    assert not (runs / "2" / "abra").exists() and not (runs / "2" / OWNER).exists()
    assert (runs / "2" / "report.json").exists()
    assert (runs / "1" / "abra" / "recipes" / "demo").is_dir()
    assert snapshot(abra_home) == before
    assert sweep_abra_dirs(runs) == []
    live.send("leave")
    assert live.wait() == 0
    assert sweep_abra_dirs(runs) == []  # a clean leave left nothing to sweep


def test_a_killed_reapers_run_directory_is_swept_and_a_live_ones_is_not(tmp_path):
    import subprocess

    from ccci.harness.abradir import reaper_prefix

    runs = tmp_path / "runs"
    runs.mkdir()
    live = runs / (reaper_prefix(7) + "abc")  # this process, still at work
    live.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = runs / f"reap-8-{dead.pid}-12345-xyz"  # a reaper SIGKILLed mid-reap
    (gone / "abra" / "recipes").mkdir(parents=True)
    sweep_abra_dirs(runs)
    assert live.exists() and not gone.exists()
