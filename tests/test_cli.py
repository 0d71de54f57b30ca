"""The command line, run as a person would: real subprocesses, real exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ccci.store import Store
from tests.fakes.gitrepo import git
from tests.pipeline.pipeline_helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent


def ccci(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ccci", *args], env=env, cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.fixture
def env(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("CCCI_")}
    return {**base, "PYTHONPATH": str(ROOT), "CCCI_STATE_DIR": str(tmp_path / "state"),
            "CCCI_LOCK_DIR": str(tmp_path / "locks"), "CCCI_ABRA_HOME": str(tmp_path / "abra"),
            "CCCI_EXECUTOR": "bwrap"}  # fmt: skip


@pytest.fixture
def checkout(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text("a recipe\n")
    git("init", "-q", str(src))
    git("add", ".", cwd=src)
    git("commit", "-qm", "recipe", cwd=src)
    return src


def test_test_passes_on_the_hello_recipe_and_prints_json(env, checkout):
    done = ccci("test", "hello", "--source", str(checkout), "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "passed" and report["passed"] is True
    assert report["sha"] == git("rev-parse", "HEAD", cwd=checkout)
    assert {s["name"] for s in report["steps"]} == {"deploy", "checkout", "config", "metrics", "teardown"}
    assert "✅ deploy" in done.stderr  # live progress on the terminal


def test_test_fails_with_exit_1_and_a_directory_recipe(env, checkout, tmp_path):
    recipe = tmp_path / "failing"
    recipe.mkdir()
    (recipe / "ci.yml").write_text("steps:\n  - name: boom\n    run: echo doomed; exit 3\n")
    done = ccci("test", str(recipe), "--source", str(checkout), env=env)
    assert done.returncode == 1
    assert "failed" in done.stderr


def test_an_invalid_ci_yml_is_an_error_naming_the_file(env, checkout, tmp_path):
    recipe = tmp_path / "broken"
    recipe.mkdir()
    (recipe / "ci.yml").write_text("steps:\n  - name: a\n    run: true\n    needz: [b]\n")
    done = ccci("test", str(recipe), "--source", str(checkout), "--json", env=env)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    [note] = report["notes"]
    assert report["status"] == "error" and note.startswith("broken/ci.yml, line 4, column 5: step a: key 'needz'")
    assert str(tmp_path) not in note  # what the PR would show: no path of the server


@pytest.mark.parametrize(
    "args, message",
    [
        (["test", "Bad Name!", "--source", "."], "not a recipe name"),
        (
            ["run", "--run-id", "1", "--recipe", "hello", "--clone-url", "http://x/y.git", "--pr", "1", "--sha", "abc"],
            "40-hex",
        ),
        (["run", "--run-id", "1"], "missing"),
    ],
)
def test_bad_input_is_refused_clearly(env, args, message):
    done = ccci(*args, env=env)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_config_error_names_the_key(env):
    done = ccci("runs", env={**env, "CCCI_MAX_RUNS": "lots"})
    assert done.returncode == 2 and "MAX_RUNS" in done.stderr


def test_runs_and_cancel_work_on_the_store(env, tmp_path):
    store = Store(tmp_path / "state" / "ccci.db")
    _, run = store.claim_comment(owner="o", repo="hello", comment_id=1, action="test",
                                 run={"pr": 4, "recipe": "hello", "requester": "alice"})  # fmt: skip
    listed = ccci("runs", "--json", env=env)
    assert [r["id"] for r in json.loads(listed.stdout)] == [run.id]
    assert "o/hello#4" in ccci("runs", env=env).stdout
    done = ccci("cancel", str(run.id), env=env)
    assert done.returncode == 0 and "cancel requested" in done.stdout
    assert store.get_run(run.id).cancel_requested == 1
    store.update_run(run.id, state="canceled")
    again = ccci("cancel", str(run.id), env=env)
    assert again.returncode == 1 and "already finished" in again.stderr
    assert "no run 999" in ccci("cancel", "999", env=env).stderr


def test_sweep_removes_a_dead_runs_abra_dir_and_reports_it(env, tmp_path):
    victim = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from ccci.harness.abradir import RunAbraDir\n"
         "box = RunAbraDir(Path(sys.argv[1]), Path(sys.argv[2]), 'hello').__enter__()\n"
         "print(box.abra_dir, flush=True); sys.stdin.read()",
         str(tmp_path / "state" / "runs" / "41"), str(tmp_path / "abra")],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    abra_dir = Path(victim.stdout.readline().strip())
    assert abra_dir.is_dir()
    live = ccci("sweep", "--json", env=env)
    assert json.loads(live.stdout)["removed_abra_dirs"] == [] and abra_dir.is_dir()  # the owner lives
    victim.kill()
    victim.communicate()
    swept = ccci("sweep", env=env)  # for people: a summary line, then one line per thing freed
    assert swept.returncode == 0 and swept.stdout.startswith("sweep: reaped 0 app(s), removed 1 ABRA_DIR(s)")
    assert f"  removed the ABRA_DIR {abra_dir}\n" in swept.stdout
    assert not abra_dir.exists()


@pytest.mark.parametrize("sha", ["a" * 40 + "\n", "A" * 40, "a" * 39])
def test_run_refuses_a_sha_that_is_not_exactly_40_hex(env, sha):
    done = ccci("run", "--run-id", "1", "--recipe", "hello", "--clone-url", "http://x/y.git", "--pr", "1",
                "--sha", sha, env=env)  # fmt: skip
    assert done.returncode == 1 and "40-hex" in done.stderr


def test_an_unusable_lock_dir_is_a_sentence_naming_the_setting(env, checkout, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the lock directory should be\n")
    done = ccci("test", "hello", "--source", str(checkout), "--json", env={**env, "CCCI_LOCK_DIR": str(blocker / "x")})
    assert done.returncode == 1
    [note] = json.loads(done.stdout)["notes"]
    assert "LOCK_DIR" in note and "set CCCI_LOCK_DIR" in note


def test_artifacts_steps_leave_are_kept_with_the_run(env, checkout, tmp_path):
    recipe = tmp_path / "reports"
    recipe.mkdir()
    (recipe / "ci.yml").write_text(
        "steps:\n  - name: report\n"
        "    run: mkdir -p .ccci/artifacts && echo '<testsuite/>' > .ccci/artifacts/junit.xml\n"
    )
    done = ccci("test", str(recipe), "--source", str(checkout), "--json", env=env)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["artifacts"] == ["junit.xml"]
    [kept] = (tmp_path / "state" / "runs").glob("*/artifacts/junit.xml")
    assert kept.read_text() == "<testsuite/>\n"
    assert not list((tmp_path / "state" / "runs").glob("*/abra"))  # the ABRA_DIR itself is gone


def test_sweep_reaps_a_dead_runs_app_through_its_recipes_teardown_and_leaves_nothing(env, tmp_path):
    from dataclasses import asdict

    from ccci.harness.applock import LockHolder, lock_path

    recipes = tmp_path / "recipes"
    (recipes / "reaper").mkdir(parents=True)
    (recipes / "reaper" / "ci.yml").write_text(
        "steps:\n  - name: deploy\n    run: exit 99\n"
        "  - name: undeploy\n    teardown: true\n"
        '    run: echo "$APP_DOMAIN run $CCCI_RUN" >> "$ABRA_DIR/servers/reaped"\n'
    )
    (tmp_path / "abra" / "servers").mkdir(parents=True)
    (tmp_path / "abra" / "servers").chmod(0o1777)  # steps run as SANDBOX_USER (nobody) under root
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    holder = LockHolder("reaper.ci.localhost", "77", "reaper", dead.pid, None, 0.0)
    lock_path(lock_dir, holder.app_domain).write_text(json.dumps(asdict(holder)))

    swept = ccci("sweep", env={**env, "CCCI_RECIPES_DIR": str(recipes)})
    assert swept.returncode == 0, swept.stderr
    assert "  reaped reaper.ci.localhost of dead run 77\n" in swept.stdout
    assert (tmp_path / "abra" / "servers" / "reaped").read_text() == "reaper.ci.localhost run 77\n"
    assert not list(lock_dir.iterdir())
    assert not list((tmp_path / "state" / "runs").glob("reap-*"))  # the reaper's own run directory is gone too
    again = ccci("sweep", "--json", env={**env, "CCCI_RECIPES_DIR": str(recipes)})
    assert json.loads(again.stdout)["reaped_apps"] == []
    assert (tmp_path / "abra" / "servers" / "reaped").read_text().count("\n") == 1  # exactly once


@pytest.fixture
def home_env(env, tmp_path):
    """The environment of a user who set no paths: everything follows from HOME."""
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in env.items() if k not in ("CCCI_STATE_DIR", "XDG_STATE_HOME")}
    return {**base, "HOME": str(home)}


def test_test_passes_out_of_the_box_with_the_default_state_dir(home_env, checkout):
    # The default STATE_DIR used to be ./var: bubblewrap could not bind the relative path.
    done = ccci("test", "hello", env=home_env, cwd=checkout)
    assert done.returncode == 0, done.stderr
    state = Path(home_env["HOME"]) / ".local" / "state" / "ccci"
    assert list((state / "runs").glob("local-*/report.json"))
    assert not (checkout / "var").exists()


def test_runs_and_cancel_find_the_same_store_from_any_directory(home_env, tmp_path):
    assert ccci("runs", env=home_env).stderr.startswith("no runs yet: there is no database at")
    assert "no database" in ccci("cancel", "1", env=home_env).stderr
    state = Path(home_env["HOME"]) / ".local" / "state" / "ccci"
    assert not state.exists()  # looking created nothing
    _, run = Store(state / "ccci.db").claim_comment(owner="o", repo="hello", comment_id=1, action="test",
                                                    run={"pr": 4, "recipe": "hello", "requester": "alice"})  # fmt: skip
    for cwd in (Path("/"), tmp_path, ROOT):
        assert [r["id"] for r in json.loads(ccci("runs", "--json", env=home_env, cwd=cwd).stdout)] == [run.id]


@pytest.mark.parametrize("where", ["/", "home"])
def test_test_refuses_to_copy_the_whole_filesystem_or_home(home_env, where):
    cwd = Path(home_env["HOME"]) if where == "home" else Path("/")
    done = ccci("test", "hello", env=home_env, cwd=cwd)
    assert done.returncode == 1 and "refusing to copy" in done.stderr and "--source" in done.stderr


def test_a_failing_test_shows_why_and_where_its_files_are(env, checkout, tmp_path):
    recipe = tmp_path / "failing"
    recipe.mkdir()
    (recipe / "ci.yml").write_text(
        "steps:\n  - name: boom\n    run: |\n      for i in $(seq 100); do echo progress $i; done\n"
        "      echo 'error: the database refused the connection' >&2; exit 3\n"
    )
    done = ccci("test", str(recipe), "--source", str(checkout), env=env)
    assert done.returncode == 1
    err = done.stderr
    assert "last lines of boom (failed, exit 3):" in err
    # The real error comes first, then the tail of stdout (as the PR comment shows it).
    assert err.index("error: the database refused the connection") < err.index("progress 100")
    assert "progress 1\n" not in err  # a tail, not the whole output
    log = Path(re.search(r"^  log:    (\S+)$", err, re.M)[1])
    report = Path(re.search(r"^  report: (\S+)$", err, re.M)[1])
    assert "progress 100" in log.read_text() and json.loads(report.read_text())["status"] == "failed"


def test_a_broken_ci_yml_says_why_on_the_terminal(env, checkout, tmp_path):
    recipe = tmp_path / "broken"
    recipe.mkdir()
    (recipe / "ci.yml").write_text("steps:\n  - name: a\n    run: echo: x\n")
    done = ccci("test", str(recipe), "--source", str(checkout), env=env)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    at = lines.index("  broken/ci.yml, line 3, column 14: not valid YAML: mapping values are not allowed here")
    assert lines[at + 1].strip() == "run: echo: x" and lines[at + 2].strip() == "^"
    assert "(0/0 steps passed)" in done.stderr and "  report: " in done.stderr


def test_image_build_says_what_it_built_and_json_on_request(env, tmp_path):
    from tests.vm.vmhelpers import shared_vm_state

    state = shared_vm_state(tmp_path)  # the tiny image, built once and cached across sessions
    env = {**env, "CCCI_STATE_DIR": str(state)}
    done = ccci("image", "build", "tiny", env=env)
    assert done.returncode == 0, done.stderr
    assert re.match(r"image tiny was already built: [0-9a-f]{12} from linux-image-\S+, in /", done.stdout)
    assert "ImageInfo(" not in done.stdout and "  kernel:    /" in done.stdout
    data = json.loads(ccci("image", "build", "tiny", "--json", env=env).stdout)
    assert data["name"] == "tiny" and data["cached"] is True and Path(data["kernel"]).is_file()


def open_writer(fifo: Path) -> int | None:
    """Open ``fifo`` for writing once a reader has it open (None until then; never blocks)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader yet
        return None


def test_a_second_sigterm_during_teardown_does_not_cut_the_harness_teardown_short(env, checkout, tmp_path):
    # The real harness, its guard and the bwrap sandbox: the first SIGTERM cancels the run, the
    # second arrives while the teardown step is blocked on a fifo and must not stop it.
    marks = tmp_path / "marks"
    marks.mkdir()
    marks.chmod(0o777)  # the sandbox runs steps as an unprivileged user
    os.mkfifo(marks / "go", 0o666)
    recipe = tmp_path / "slow-teardown"
    recipe.mkdir()
    (recipe / "ci.yml").write_text(
        "steps:\n"
        f"  - name: work\n    run: touch {marks}/work.started && sleep 300\n"
        "  - name: down\n    teardown: true\n"
        f"    run: echo begun > {marks}/down.begun && read line < {marks}/go && echo $line > {marks}/down.done\n"
    )
    harness = subprocess.Popen(
        [sys.executable, "-m", "ccci", "test", str(recipe), "--source", str(checkout), "--json"], cwd=ROOT,
        env={**env, "CCCI_SANDBOX_WRITABLE": str(marks)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: (marks / "work.started").exists() or harness.poll() is not None, timeout=60, what="work")
        harness.send_signal(signal.SIGTERM)
        wait_for(lambda: (marks / "down.begun").exists() or harness.poll() is not None, timeout=60, what="teardown")
        harness.send_signal(signal.SIGTERM)
        harness.send_signal(signal.SIGINT)
        go = wait_for(lambda: open_writer(marks / "go"), timeout=60, what="the teardown step to open the fifo")
        assert harness.poll() is None, "the second signal ended the harness during teardown"
        os.write(go, b"released\n")
        os.close(go)
        out, err = harness.communicate(timeout=60)
    finally:
        harness.kill()
        harness.wait()
    report = json.loads(out)
    assert report["status"] == "canceled", err
    assert {s["name"]: s["status"] for s in report["steps"]} == {"work": "canceled", "down": "passed"}
    assert (marks / "down.done").read_text() == "released\n"


def test_on_the_host_the_steps_are_told_so_and_the_report_says_host(env, checkout, tmp_path):
    recipe = tmp_path / "modes"
    recipe.mkdir()
    (recipe / "ci.yml").write_text("steps:\n  - name: where\n    run: echo $CCCI_MODE\n")
    done = ccci("test", str(recipe), "--source", str(checkout), "--json", env=env)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["mode"] == "host" and report["steps"][0]["stdout"] == "host\n"


def test_the_docker_image_is_not_built_without_abra_for_pipelines_that_run_it(env):
    done = ccci("image", "build", "docker", env=env)  # RECIPES_DIR: the packaged recipes, _default runs abra
    assert done.returncode != 0
    assert "ABRA_BIN: the docker image needs abra: the ci.yml of _default" in done.stderr
    assert "scripts/abra builds one" in done.stderr
