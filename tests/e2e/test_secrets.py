"""No secret value appears in a comment, a log or a report — checked on everything a run leaves."""

from __future__ import annotations

import requests

from tests.e2e.conftest import SECRET

LEAKY_CI = """\
env:
  DEPLOY_KEY: {from_env: CCCI_FORGE_TOKEN, secret: true}
steps:
  - name: leak
    run: |
      echo "forge token: $DEPLOY_KEY"
      echo "webhook secret: %s" >&2
      echo "::metric leaked=1"
      exit 1
"""


def test_secrets_printed_by_a_step_are_redacted_everywhere(make_world, tmp_path):
    recipes = tmp_path / "recipes" / "hello"
    recipes.mkdir(parents=True)
    (recipes / "ci.yml").write_text(LEAKY_CI % SECRET)
    world = make_world(CCCI_RECIPES_DIR=str(recipes.parent))
    sha = world.open_pr(40)
    _, payload = world.comment(40, "!testme")
    run_id = world.deliver(payload).json()["run"]
    world.gitea.wait_for(lambda g: "failure" in [s["state"] for s in g.statuses.get(sha, [])], timeout=60)
    world.gitea.wait_for(lambda g: any("failed" in c.body for c in world.ccci_comments(40)), timeout=30)

    token = world.gitea.token
    [comment] = world.ccci_comments(40)
    page = requests.get(f"{world.ccci.url}/runs/{run_id}", timeout=10).text
    report = requests.get(f"{world.ccci.url}/runs/{run_id}", headers={"Accept": "application/json"}, timeout=10).text
    log = requests.get(f"{world.ccci.url}/runs/{run_id}/log", timeout=10).text
    run_dir = world.state_dir / "runs" / str(run_id)
    files = {p.name: p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file()}
    everything = {"comment": comment.body, "page": page, "report": report, "log": log, **files}
    for where, text in everything.items():
        assert token not in text, f"forge token in {where}"
        assert SECRET not in text, f"webhook secret in {where}"
    assert "forge token: [redacted]" in comment.body and "[redacted]" in log
    for history in comment.history:
        assert token not in history and SECRET not in history
