"""A run's life on a real Gitea: closed before it starts, edited comments, cancel, a push mid-run."""

from __future__ import annotations

import json

from tests.e2e_gitea.conftest import REPO


def test_a_pr_closed_before_the_run_starts_is_not_run(gitea_world):
    world = gitea_world()
    world.release()
    pr, sha = world.open_pr("closing")
    with world.hook_gate.hold():  # the delivery is on its way while the PR closes
        comment_id = world.comment(pr, "!testme")
        world.hook_gate.wait_for(lambda gate: gate.arrivals)
        world.admin.close_pull(world.org, REPO, pr, as_user=world.member)
    run = world.run_of(comment_id)  # Gitea's payload still says "open": ccci finds out from the API
    final = world.bot_comment_with(pr, "closed before the run started")
    assert "canceled" in final["body"]
    assert not (world.marks / f"started-{run}").exists()
    assert world.admin.statuses(world.org, REPO, sha) == []
    assert [r["state"] for r in world.runs()] == ["canceled"]


def test_a_comment_edited_to_add_testme_is_ignored(gitea_world):
    world = gitea_world()
    world.release()
    pr, _ = world.open_pr("edited")
    comment_id = world.comment(pr, "Looks good to me.")
    assert json.loads(world.delivery(comment_id).response_body)["result"] == "ignored"
    world.admin.edit_comment(world.org, REPO, comment_id, "Looks good to me.\n\n!testme", as_user=world.member)
    edited = world.delivery(comment_id, action="edited")
    assert edited.status == 200
    assert json.loads(edited.response_body) == {"result": "ignored", "reason": "action edited is ignored"}
    world.settled()
    assert world.runs() == [] and world.bot_comments(pr) == []
    assert world.admin.reactions(world.org, REPO, comment_id) == []
    assert world.forge_proxy.exchanges() == []  # ccci never even asked Gitea anything


def test_testme_cancel_stops_the_run_mid_step(gitea_world):
    world = gitea_world()
    pr, sha = world.open_pr("cancel-me")
    run = world.run_of(world.comment(pr, "!testme"))
    world.started(run)
    cancel = world.comment(pr, "!testme cancel")
    assert world.delivery(cancel).status == 202
    final = world.bot_comment_saying(pr, "canceled")
    assert f"@{world.member}" in final["body"]
    assert (world.marks / f"teardown-{run}").exists(), "the teardown step did not run"
    world.until(lambda: (world.bot, "+1") in world.admin.reactions(world.org, REPO, cancel), "the +1 on the cancel")
    world.status_becomes(sha, "error")
    assert len(world.bot_comments(pr)) == 1
    assert [r["state"] for r in world.runs()] == ["canceled"]


def test_a_push_during_the_run_is_reported_as_stale(gitea_world):
    world = gitea_world()
    pr, sha = world.open_pr("moving")
    run = world.run_of(world.comment(pr, "!testme"))
    world.started(run)
    newer = world.checkout.commit_and_push("moving", {"more.txt": "pushed while the run ran\n"})
    world.until(lambda: world.admin.pull(world.org, REPO, pr)["head"]["sha"] == newer, "Gitea to move the PR head")
    world.release(run)
    final = world.bot_comment_saying(pr, "passed")
    assert "Stale" in final["body"] and newer[:10] in final["body"] and f"at [`{sha[:10]}`]" in final["body"]
    assert world.run_json(run)["report"]["sha"] == sha
    # The statuses belong to the commit that was tested, not to the new head.
    world.status_becomes(sha, "success")
    assert world.admin.statuses(world.org, REPO, newer) == []
