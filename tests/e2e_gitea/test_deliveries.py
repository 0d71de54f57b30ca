"""Gitea's own delivery machinery: its replay of a delivery, and a hook with the wrong secret."""

from __future__ import annotations

import json

from tests.e2e_gitea.conftest import REPO


def test_a_replayed_delivery_makes_no_second_run(gitea_world):
    world = gitea_world()
    world.release()
    pr, _ = world.open_pr("replayed")
    comment_id = world.comment(pr, "!testme")
    run = world.run_of(comment_id)
    world.bot_comment_saying(pr, "passed")

    web = world.gitea.web()
    try:
        history = web.org_hook_deliveries(world.org, world.hook_id)
        [original] = [d for d in history if d.about(comment_id)]
        assert original.status == 202
        web.replay_org_hook(world.org, world.hook_id, original.uuid)  # Gitea's "replay" button
        first, second = world.deliveries(comment_id, count=2)
        assert first.request_body == second.request_body  # the same payload, sent again
        assert second.status == 200
        assert json.loads(second.response_body) == {
            "result": "ignored",
            "reason": "comment already handled",
            "run": run,
        }
        about = world.until(
            lambda: (
                [d for d in web.org_hook_deliveries(world.org, world.hook_id) if d.about(comment_id) and d.status][1:]
                and [d for d in web.org_hook_deliveries(world.org, world.hook_id) if d.about(comment_id)]
            ),
            "Gitea to record the replay",
        )
        assert len(about) == 2 and {d.status for d in about} == {200, 202}
        assert len({d.uuid for d in about}) == 2  # a replay is a delivery of its own
    finally:
        web.close()
    world.settled()
    assert [r["id"] for r in world.runs()] == [run]
    assert len(world.bot_comments(pr)) == 1


def test_a_hook_with_the_wrong_secret_is_refused_and_gitea_shows_the_401(gitea_world):
    world = gitea_world(hook_secret="not-the-secret-ccci-has")
    pr, _ = world.open_pr("wrong-secret")
    comment_id = world.comment(pr, "!testme")
    assert world.delivery(comment_id).status == 401

    web = world.gitea.web()
    try:
        [entry] = world.until(
            lambda: [d for d in web.org_hook_deliveries(world.org, world.hook_id) if d.status is not None],
            "Gitea to record the delivery",
        )
    finally:
        web.close()
    assert entry.status == 401 and "signature" in entry.response_body
    assert world.runs() == []
    assert world.admin.reactions(world.org, REPO, comment_id) == [] and world.bot_comments(pr) == []
    assert world.forge_proxy.exchanges() == []
