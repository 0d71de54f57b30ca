"""What ccci asks of a real Gitea, counted at a proxy in front of it."""

from __future__ import annotations

import json
import re


def test_creating_the_run_comment_lists_the_comments_once(gitea_world):
    # Gitea's comment list has no paging (it takes only since/before and returns every comment):
    # a client that pages until it sees an empty page never sees one, and stops after 1000.
    world = gitea_world()
    world.release()
    pr, _ = world.open_pr("chatty")
    for i in range(5):
        world.comment(pr, f"Review note {i}.")
    run = world.run_of(world.comment(pr, "!testme"))
    world.bot_comment_saying(pr, "passed")
    world.settled()

    calls = world.forge_proxy.exchanges()
    comments_path = rf"/issues/{pr}/comments$"
    created = next(
        i
        for i, c in enumerate(calls)
        if c.method == "POST" and re.search(comments_path, c.path) and f"ccci:run={run}" in c.request_body.decode()
    )
    listed = [c for c in calls[:created] if c.method == "GET" and re.search(comments_path, c.path)]
    assert len(listed) == 1, f"{len(listed)} comment-list requests before creating the run's comment"
    assert len(json.loads(listed[0].response_body)) == 6  # every comment, in one answer
