"""End to end: a signed !testme through gunicorn to a final report on the (fake) forge."""

from __future__ import annotations

import requests

from tests.e2e.conftest import OWNER, REPO


def final_status(world, sha: str) -> list[str]:
    return [s["state"] for s in world.gitea.statuses.get(sha, [])]


def test_testme_runs_the_pinned_sha_and_reports_once(make_world):
    world = make_world()
    sha = world.open_pr(7)
    comment_id, payload = world.comment(7, "Looks good.\n\n!testme\n")

    answer = world.deliver(payload)
    assert answer.status_code == 202
    body = answer.json()
    assert body["result"] == "queued" and isinstance(body["run"], int)

    world.gitea.wait_for(
        lambda g: "success" in final_status(world, sha) or "failure" in final_status(world, sha), timeout=60
    )
    world.gitea.wait_for(lambda g: any("passed" in c.body for c in world.ccci_comments(7)), timeout=30)

    assert ("ccci", "eyes") in world.gitea.reactions[comment_id]
    states = final_status(world, sha)
    assert states[0] == "pending" and states[-1] == "success", states
    assert all(s["context"] == "ccci/testme" for s in world.gitea.statuses[sha])
    [status_comment] = world.ccci_comments(7)  # one comment, edited in place
    assert f"<!-- ccci:run={body['run']} -->" in status_comment.body
    assert "passed" in status_comment.body and sha[:10] in status_comment.body
    assert any("queued" in old or "running" in old for old in status_comment.history)
    # The report tested exactly the pinned commit.
    run = requests.get(f"{world.ccci.url}/runs/{body['run']}", headers={"Accept": "application/json"}, timeout=10)
    report = run.json()["report"]
    assert run.json()["sha"] == sha and report["sha"] == sha and report["status"] == "passed"
    assert [s["name"] for s in report["steps"]] == ["deploy", "checkout", "config", "metrics", "teardown"]
    checkout = next(s for s in report["steps"] if s["name"] == "checkout")
    assert f"HEAD is {sha}" in checkout["stdout"]
    log = requests.get(f"{world.ccci.url}/runs/{body['run']}/log", timeout=10).text
    assert "[deploy] deployed hello" in log
    # The maintainer's way around: comment -> run page and commit, run page -> PR and commit.
    repo_page = world.gitea.clone_url(OWNER, REPO).removesuffix(".git")
    run_page = f"http://ccci.example.test/runs/{body['run']}"
    assert f"[Run page]({run_page})" in status_comment.body and f"[Full log]({run_page}/log)" in status_comment.body
    assert f"]({repo_page}/commit/{sha})" in status_comment.body
    html = requests.get(f"{world.ccci.url}/runs/{body['run']}", timeout=10).text
    assert f'href="{repo_page}/pulls/7"' in html and f'href="{repo_page}/commit/{sha}"' in html


def test_the_same_comment_delivered_twice_makes_one_run(make_world):
    world = make_world()
    sha = world.open_pr(8)
    _, payload = world.comment(8, "!testme")
    first = world.deliver(payload)
    second = world.deliver(payload)  # a redelivery: Gitea gives it a new delivery id
    assert first.status_code == 202
    assert second.status_code == 200 and second.json()["result"] == "ignored"
    assert second.json()["run"] == first.json()["run"]
    world.gitea.wait_for(lambda g: "success" in final_status(world, sha), timeout=60)
    runs = world.admin("GET", "/admin/runs").json()["runs"]
    assert [r["id"] for r in runs] == [first.json()["run"]]
    assert len(world.ccci_comments(8)) == 1


def test_a_bad_signature_is_refused_and_changes_nothing(make_world):
    world = make_world()
    world.open_pr(9)
    _, payload = world.comment(9, "!testme")
    answer = world.deliver(payload, secret="not-the-secret")
    assert answer.status_code == 401
    unsigned = requests.post(
        world.ccci.url + "/hooks/forge", json=payload, timeout=10, headers={"X-Gitea-Event": "issue_comment"}
    )
    assert unsigned.status_code == 401
    assert world.admin("GET", "/admin/runs").json()["runs"] == []
    assert world.gitea.api_calls() == []


def test_an_unauthorized_commenter_gets_no_run(make_world):
    world = make_world()
    sha = world.open_pr(10)
    comment_id, payload = world.comment(10, "!testme", user="mallory")
    answer = world.deliver(payload)
    assert answer.status_code == 200 and answer.json()["result"] == "refused"
    world.gitea.wait_for(lambda g: ("ccci", "confused") in g.reactions.get(comment_id, []))
    world.gitea.wait_for(lambda g: len(world.ccci_comments(10)) == 1)
    # A second try by the same user: another confused reaction, no second explanation.
    second_id, second = world.comment(10, "!testme", user="mallory")
    world.deliver(second)
    world.gitea.wait_for(lambda g: ("ccci", "confused") in g.reactions.get(second_id, []))
    assert len(world.ccci_comments(10)) == 1
    assert "mallory" in world.ccci_comments(10)[0].body
    assert world.admin("GET", "/admin/runs").json()["runs"] == []
    assert sha not in world.gitea.statuses
    assert not world.gitea.api_calls("GET", f"/api/v1/repos/{OWNER}/{REPO}/pulls")


def test_organisation_members_are_admitted_and_others_refused(make_world):
    world = make_world(CCCI_ALLOWED_USERS="", CCCI_ALLOWED_ORGS="coop-cloud")
    world.gitea.add_member("coop-cloud", "carol")
    member_sha = world.open_pr(11)
    _, payload = world.comment(11, "!testme", user="carol")
    answer = world.deliver(payload)
    assert answer.status_code == 202 and answer.json()["authorization"].startswith("pending")
    world.gitea.wait_for(lambda g: "success" in final_status(world, member_sha), timeout=60)

    outsider_sha = world.open_pr(12)
    outsider_comment, payload = world.comment(12, "!testme", user="dave")
    assert world.deliver(payload).status_code == 202  # membership is checked by the worker, not here
    world.gitea.wait_for(lambda g: ("ccci", "confused") in g.reactions.get(outsider_comment, []))
    world.gitea.wait_for(lambda g: len(world.ccci_comments(12)) == 1)
    assert outsider_sha not in world.gitea.statuses
    assert [r["requester"] for r in world.admin("GET", "/admin/runs").json()["runs"]] == ["carol"]
    assert world.gitea.api_calls("GET", "/orgs/coop-cloud/members/dave")
