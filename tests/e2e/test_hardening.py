"""Attacks and accidents, end to end (gunicorn, the worker, the harness, the sandbox), as root.

Each test is one reproduced defect of issue 9: a PR's step trying to publish ccci's secrets, the
sandbox trying to get out, a forge answer that used to strand a run, a worker killed at the
worst moment, a crash between sending and recording a write, malformed deliveries, strangers.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import requests

from tests.e2e.conftest import ADMIN, OWNER, REPO, SECRET, final_comment, settled, wait_until
from tests.fakes import load_payload, sign


def recipe_ci(tmp_path: Path, text: str, **fill: str) -> Path:
    recipes = tmp_path / "recipes"
    (recipes / "hello").mkdir(parents=True, exist_ok=True)
    (recipes / "hello" / "ci.yml").write_text(text.format(**fill) if fill else text)
    return recipes


def marks_dir(tmp_path: Path) -> Path:
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    marks.chmod(0o1777)  # steps run as SANDBOX_USER (nobody) under root
    return marks


def harness_pids(world, run_id: int) -> list[int]:
    """Return the pids of this world's ``ccci run --run-id <run_id>`` processes (other tests run too)."""
    needle = f"\0--run-id\0{run_id}\0".encode()
    forge = world.gitea.url.encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                if needle in cmdline and forge in cmdline:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def run_state(world, run_id: int) -> dict:
    return next(r for r in world.admin("GET", "/admin/runs").json()["runs"] if r["id"] == run_id)


def final_state(world, run_id: int, timeout: float = 90) -> dict:
    return wait_until(
        lambda: (lambda r: r if r["state"] not in ("queued", "running") else None)(run_state(world, run_id)),
        timeout=timeout,
        what=f"run {run_id} to end",
    )


# -- secrets and the sandbox -------------------------------------------------------------------

EXFILTRATING_CI = """\
env:
  DEPLOY_KEY: {{from_env: CCCI_FORGE_TOKEN, secret: true}}
steps:
  - name: exfiltrate
    run: |
      mkdir -p .ccci/artifacts/sub
      ln -s /proc/self/environ .ccci/artifacts/env.txt
      ln -s {config} .ccci/artifacts/config.toml
      ln -s / .ccci/artifacts/host
      mkfifo .ccci/artifacts/pipe
      echo "key=$DEPLOY_KEY" > .ccci/artifacts/sub/leak.txt
      echo '<script>fetch("/admin/runs")</script>' > .ccci/artifacts/report.html
"""


def test_artifacts_cannot_carry_ccci_secrets_out(make_world, tmp_path):
    config = tmp_path / "ccci.toml"
    config.write_text(f'ADMIN_TOKEN = "{ADMIN}"\n')
    recipes = recipe_ci(tmp_path, EXFILTRATING_CI, config=str(config))
    world = make_world(CCCI_RECIPES_DIR=str(recipes), CCCI_CONFIG=str(config))
    world.open_pr(60)
    _, payload = world.comment(60, "!testme")
    run_id = world.deliver(payload).json()["run"]
    assert final_state(world, run_id)["state"] == "passed"

    report = requests.get(f"{world.ccci.url}/runs/{run_id}", headers={"Accept": "application/json"}, timeout=10)
    report = report.json()["report"]
    assert report["artifacts"] == ["report.html", "sub/leak.txt"]
    [dropped] = [n for n in report["notes"] if n.startswith("artifacts left out")]
    for name in ("env.txt: a symlink", "config.toml: a symlink", "host: a symlink", "pipe: not a regular file"):
        assert name in dropped
    base = f"{world.ccci.url}/runs/{run_id}/artifacts"
    for name in ("env.txt", "config.toml", "host/etc/passwd", "pipe"):
        assert requests.get(f"{base}/{name}", timeout=10).status_code == 404
    leak = requests.get(f"{base}/sub/leak.txt", timeout=10)
    assert leak.text == "key=[redacted]\n" and world.gitea.token not in leak.text
    page = requests.get(f"{base}/report.html", timeout=10)
    assert page.headers["Content-Disposition"].startswith("attachment")
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Content-Security-Policy"] == "sandbox"
    for path in (world.state_dir / "runs" / str(run_id)).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in (world.gitea.token, SECRET, ADMIN):
                assert secret.encode() not in data, path


ESCAPING_CI = """\
network: false
steps:
  - name: escape
    run: |
      id -u
      mount -o remount,rw / 2>/dev/null && echo ESCAPED-remount
      touch /usr/ccci-escaped 2>/dev/null && echo ESCAPED-write-usr
      touch {tmp}/ccci-escaped 2>/dev/null && echo ESCAPED-write-tmp
      cat {config} 2>/dev/null | grep -q . && echo ESCAPED-config
      cat {state}/ccci.db 2>/dev/null | grep -q . && echo ESCAPED-db
      ls {state}/runs
      ls {locks} 2>/dev/null | grep -q . && echo ESCAPED-locks
      cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -q -e _TOKEN= -e _SECRET= && echo ESCAPED-environ
      python3 -c 'import socket; socket.create_connection(("127.0.0.1", {port}), timeout=3)' 2>/dev/null \\
        && echo ESCAPED-network
      echo "still here" > inside.txt && cat inside.txt
      exit 0
"""


def test_the_process_sandbox_holds_as_root(make_world, tmp_path):
    assert os.geteuid() == 0, "this test is about running as root, as CI does"
    config = tmp_path / "ccci.toml"
    config.write_text(f'ADMIN_TOKEN = "{ADMIN}"\n')
    config.chmod(0o644)  # readable by anyone on the host: the sandbox must hide it anyway
    # The world needs its port before the file: write the CI with a placeholder, then fill it.
    recipes = recipe_ci(tmp_path, "steps: [{name: x, run: 'true'}]\n")
    world = make_world(CCCI_RECIPES_DIR=str(recipes), CCCI_CONFIG=str(config))
    (world.state_dir / "ccci.db").chmod(0o644)
    recipe_ci(
        tmp_path,
        ESCAPING_CI,
        tmp=str(tmp_path),
        config=str(config),
        state=str(world.state_dir),
        locks=str(tmp_path / "locks"),
        port=str(world.ccci.port),
    )
    other = world.state_dir / "runs" / "999"  # another run's directory
    other.mkdir(parents=True)
    sha = world.open_pr(61)
    _, payload = world.comment(61, "!testme")
    run_id = world.deliver(payload).json()["run"]
    assert final_state(world, run_id)["state"] == "passed"
    [step] = requests.get(f"{world.ccci.url}/runs/{run_id}", headers={"Accept": "application/json"},
                          timeout=10).json()["report"]["steps"]  # fmt: skip
    out = step["stdout"]
    assert "ESCAPED" not in out, out
    lines = out.split("\n")
    assert lines[0] == "65534"  # nobody, not root
    assert lines[1] == str(run_id)  # its own run directory only, not 999
    assert "still here" in out
    assert not Path("/usr/ccci-escaped").exists() and not (tmp_path / "ccci-escaped").exists()
    assert world.gitea.statuses[sha][-1]["state"] == "success"


def test_the_harness_holds_no_secret_it_does_not_need(make_world, tmp_path):
    marks = marks_dir(tmp_path)
    recipes = recipe_ci(tmp_path, f"steps:\n  - name: hold\n    run: while [ ! -e {marks}/go ]; do sleep 0.05; done\n")
    world = make_world(CCCI_RECIPES_DIR=str(recipes), CCCI_SANDBOX_WRITABLE=str(marks))
    world.open_pr(62)
    _, payload = world.comment(62, "!testme")
    run_id = world.deliver(payload).json()["run"]
    [pid] = wait_until(lambda: harness_pids(world, run_id), what="the harness")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (marks / "go").touch()
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
    values = b"\0".join(environ)
    for secret in (world.gitea.token, SECRET, ADMIN):
        assert secret.encode() not in values
    assert not names & {"CCCI_FORGE_TOKEN", "CCCI_WEBHOOK_SECRET", "CCCI_ADMIN_TOKEN", "CCCI_DRONE_TOKEN"}
    assert "CCCI_CONFIG" not in names
    assert final_state(world, run_id)["state"] == "passed"


# -- every accepted run ends exactly once ------------------------------------------------------


def test_a_pull_request_the_forge_does_not_know_ends_in_one_error_report(make_world):
    world = make_world()
    world.open_pr(63)
    _, payload = world.comment(63, "!testme")
    del world.gitea.pulls[(OWNER, REPO, 63)]  # deleted on the forge before the worker asks
    run_id = world.deliver(payload).json()["run"]
    run = final_state(world, run_id, timeout=30)
    assert run["state"] == "error" and "not found" in run["note"] and "404" in run["note"]
    settled(world)  # nothing left to say on a PR that does not exist (Gitea would answer 500 for ever)
    assert len(world.gitea.api_calls("GET", r"/pulls/63$")) == 1  # asked once, not for ever
    page = requests.get(f"{world.ccci.url}/runs/{run_id}", headers={"Accept": "application/json"}, timeout=10)
    assert "not found" in page.json()["report"]["notes"][0]


def test_a_head_sha_that_is_not_a_commit_id_ends_in_one_error_report(make_world):
    world = make_world()
    world.open_pr(64)
    world.gitea.pulls[(OWNER, REPO, 64)].head_sha = "not-a-sha; rm -rf /"
    _, payload = world.comment(64, "!testme")
    run_id = world.deliver(payload).json()["run"]
    run = final_state(world, run_id, timeout=30)
    assert run["state"] == "error" and "is not a sha" in run["note"]
    comment = final_comment(world, 64, "error")
    assert "is not a sha" in comment.body
    settled(world)
    assert len(world.ccci_comments(64)) == 1


HELD_CI = """\
steps:
  - name: work
    run: |
      echo "$CCCI_RUN" >> {marks}/steps
      sleep 0.5
"""


def test_a_worker_killed_as_its_harness_starts_never_runs_a_step_twice(make_split_world, tmp_path):
    marks = marks_dir(tmp_path)
    world = make_split_world(
        CCCI_RECIPES_DIR=str(recipe_ci(tmp_path, HELD_CI, marks=str(marks))), CCCI_SANDBOX_WRITABLE=str(marks)
    )
    runs = []
    for i in range(20):
        world.open_pr(100 + i)
        _, payload = world.comment(100 + i, "!testme")
        run_id = world.deliver(payload).json()["run"]
        runs.append(run_id)
        [pid] = wait_until(
            lambda run_id=run_id: harness_pids(world, run_id), timeout=60, what=f"run {run_id}'s harness"
        )
        time.sleep((i % 5) * 0.05)  # different moments of its start: before, at and after the gate
        world.ccci.kill_worker()
        # No harness outlives its worker: it sees the worker go (PDEATHSIG) and ends.
        wait_until(lambda pid=pid: not alive(pid), timeout=60, what=f"harness {pid} to end with its worker")
        world.ccci.start_worker()
    for run_id in runs:
        final_state(world, run_id, timeout=120)
    settled(world)
    started = (marks / "steps").read_text().split() if (marks / "steps").exists() else []
    verdicts = {run_id: run_state(world, run_id)["state"] for run_id in runs}
    for run_id in runs:
        assert started.count(str(run_id)) <= 1, f"run {run_id}'s step ran {started.count(str(run_id))} times"
        if verdicts[run_id] == "passed":
            assert started.count(str(run_id)) == 1
        assert len(world.ccci_comments(100 + runs.index(run_id))) == 1
    assert sum(v == "passed" for v in verdicts.values()) >= 10, verdicts  # most were simply started again


def test_a_crash_between_sending_and_recording_a_write_repeats_nothing(make_split_world, tmp_path):
    marks = marks_dir(tmp_path)
    world = make_split_world(
        CCCI_RECIPES_DIR=str(recipe_ci(tmp_path, HELD_CI, marks=str(marks))),
        CCCI_ALLOWED_ORGS="coop-cloud",
        CCCI_SANDBOX_WRITABLE=str(marks),
    )
    # A status: it lands on the forge, and the worker is killed before it hears so.
    held = world.gitea.hold_after_write("POST", r"/statuses/")
    sha = world.open_pr(70)
    _, payload = world.comment(70, "!testme")
    world.deliver(payload)
    world.gitea.wait_for(lambda g: g.statuses.get(sha), timeout=60)
    world.ccci.kill_worker()
    held.set()
    world.ccci.start_worker()
    world.gitea.wait_for(lambda g: g.statuses[sha][-1]["state"] == "success", timeout=90)
    settled(world)
    seen = [(s["state"], s["description"]) for s in world.gitea.statuses[sha]]
    assert seen.count(("pending", "run #1 queued")) == 1, seen  # the write that was in flight: once

    # A refusal comment, the same way: a stranger's !testme is explained once, not twice.
    held = world.gitea.hold_after_write("POST", r"/issues/71/comments$")
    world.open_pr(71)
    _, stranger = world.comment(71, "!testme", user="mallory")
    world.deliver(stranger)
    world.gitea.wait_for(lambda g: world.ccci_comments(71), timeout=60)
    world.ccci.kill_worker()
    held.set()
    world.ccci.start_worker()
    settled(world)
    refusals = [c for c in world.ccci_comments(71) if "only maintainers" in c.body]
    assert len(refusals) == 1


# -- bad input and strangers -------------------------------------------------------------------


def test_nested_json_and_huge_numbers_are_refused_with_4xx(make_world):
    world = make_world()
    url = world.ccci.url + "/hooks/forge"

    def post(body: bytes) -> requests.Response:
        return requests.post(url, data=body, headers=sign(body, SECRET), timeout=10)

    valid = load_payload("gitea_pr_comment_created", comment__body="!testme", comment__user__login="alice")
    bodies = [
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({**valid, "comment": {**valid["comment"], "id": "BIG"}}).replace('"BIG"', "9" * 5000).encode(),
        json.dumps({**valid, "comment": {**valid["comment"], "id": 2**63}}).encode(),
        json.dumps({**valid, "issue": {**valid["issue"], "number": 2**64 + 1}}).encode(),
        ('{"action": "created", "issue": {"number": ' + "1" * 5000 + "}}").encode(),
    ]
    for body in bodies:
        answer = post(body)
        assert 400 <= answer.status_code < 500, (answer.status_code, body[:80])
    for query in ("pr=" + "9" * 30, "pr=18446744073709551616", "pr=-1", "limit=abc"):
        assert world.admin("GET", f"/admin/runs?{query}").status_code == 400
    assert requests.get(f"{world.ccci.url}/runs/{2**70}", timeout=10).status_code == 404
    assert world.admin("POST", f"/admin/runs/{2**70}/cancel").status_code == 404
    assert world.admin("GET", "/admin/runs").json()["runs"] == []


def test_a_strangers_malformed_commands_get_no_reply(make_world):
    world = make_world(CCCI_ALLOWED_ORGS="coop-cloud")  # mallory is no member: the worker checks
    world.open_pr(75)
    for i in range(5):
        _, payload = world.comment(75, f"!testme please {i}", user="mallory")
        assert world.deliver(payload).status_code == 200
    _, cancel = world.comment(75, "!testme cancel", user="mallory")
    world.deliver(cancel)
    for i in range(2):  # a maintainer's typo gets help, once
        _, payload = world.comment(75, f"!testme plz {i}", user="alice")
        world.deliver(payload)
    settled(world)
    world.gitea.wait_for(lambda g: any("did not understand" in c.body for c in world.ccci_comments(75)))
    settled(world)
    bodies = [c.body for c in world.ccci_comments(75)]
    assert sum("did not understand" in b for b in bodies) == 1
    assert not any("@mallory" in b for b in bodies[:-1] + bodies[-1:] if "did not understand" in b)
    # mallory's cancel is refused once; her malformed commands got nothing, not even a reaction.
    assert sum("@mallory" in b for b in bodies) == 1
    mallory = [c.id for c in world.gitea.comments_on(OWNER, REPO, 75) if c.user == "mallory"]
    assert not any(world.gitea.reactions.get(cid) for cid in mallory[:5])


# -- what the report says ----------------------------------------------------------------------

SLOW_CI = """\
timeout: 120
steps:
  - name: work
    run: while [ ! -e {marks}/release ]; do sleep 0.05; done
  - name: teardown
    teardown: true
    timeout: 5
    run: '{teardown}'
"""


def test_a_killed_harness_is_cleaned_up_before_its_report_says_so(make_world, tmp_path):
    marks = marks_dir(tmp_path)
    world = make_world(
        CCCI_RECIPES_DIR=str(recipe_ci(tmp_path, SLOW_CI, marks=str(marks), teardown="true")),
        CCCI_SANDBOX_WRITABLE=str(marks),
    )
    world.open_pr(72)
    _, payload = world.comment(72, "!testme")
    run_id = world.deliver(payload).json()["run"]
    [pid] = wait_until(lambda: harness_pids(world, run_id), what="the harness")
    locks = tmp_path / "locks"
    events = world.state_dir / "runs" / str(run_id) / "events.jsonl"
    wait_until(lambda: events.exists() and '"started"' in events.read_text(), what="its step to start")
    assert list(locks.glob("*.lock"))  # it holds its app
    os.kill(pid, signal.SIGKILL)
    comment = final_comment(world, 72, "error")
    # The comment is written after the cleanup: at this moment nothing of the run is left.
    assert "cleaned up" in comment.body
    assert not list(locks.glob("*.lock"))
    assert not (world.state_dir / "runs" / str(run_id) / "abra").exists()


def test_a_harness_that_outlives_its_deadline_is_killed_by_the_worker(make_world, tmp_path):
    marks = marks_dir(tmp_path)
    ci = recipe_ci(tmp_path, SLOW_CI, marks=str(marks), teardown="sleep 3600  # ccci-hard-deadline-test")
    world = make_world(
        CCCI_RECIPES_DIR=str(ci), CCCI_RUN_TIMEOUT="3", CCCI_RUN_GRACE="3", CCCI_SANDBOX_WRITABLE=str(marks)
    )
    world.open_pr(73)
    _, payload = world.comment(73, "!testme")
    run_id = world.deliver(payload).json()["run"]
    run = final_state(world, run_id, timeout=60)
    assert run["state"] == "timed_out"
    assert "outlived" in final_comment(world, 73, "timed out").body
    assert not harness_pids(world, run_id)
    wait_until(
        lambda: (
            not any(
                b"ccci-hard-deadline-test" in (p / "cmdline").read_bytes()
                for p in Path("/proc").iterdir()
                if p.name.isdigit() and (p / "cmdline").exists()
            )
        ),
        timeout=30,
        what="the teardown step to die with its harness",
    )
