"""!testme against a real Gitea: its signed webhook in, ccci's reaction, comment and statuses out."""

from __future__ import annotations

import re

from tests.e2e_gitea.conftest import REPO


def test_testme_runs_the_pr_head_and_reports_in_one_comment(gitea_world):
    world = gitea_world(CCCI_MAX_RUNS="1")  # one run at a time: the second one visibly queues
    first_pr, _ = world.open_pr("first")
    pr, sha = world.open_pr("bump-nginx", {"compose.yml": "services: {}\n"})
    assert world.admin.pull(world.org, REPO, pr)["head"]["sha"] == sha

    first = world.run_of(world.comment(first_pr, "!testme"))
    world.started(first)
    comment_id = world.comment(pr, "Looks good.\n\n!testme\n")
    delivery = world.delivery(comment_id)
    assert delivery.status == 202  # Gitea's own delivery, answered by ccci
    run = world.run_of(comment_id)

    # Gitea shows: the eyes reaction, and ccci's one comment, queued behind the first run.
    world.until(lambda: (world.bot, "eyes") in world.admin.reactions(world.org, REPO, comment_id), "eyes")
    queued = world.bot_comment_saying(pr, "queued")
    assert f"<!-- ccci:run={run} -->" in queued["body"] and sha[:10] in queued["body"]
    pending = world.until(lambda: world.admin.statuses(world.org, REPO, sha), "the pending status")
    assert [s["status"] for s in pending] == ["pending"]
    world.bot_comment_saying(first_pr, "running")

    world.release(first)
    world.started(run)
    world.bot_comment_saying(pr, "running")
    world.release(run)
    final = world.bot_comment_saying(pr, "passed")

    [only] = world.bot_comments(pr)  # one comment, edited in place
    assert only["id"] == queued["id"] == final["id"]
    history = world.admin.comment_history(world.org, REPO, pr, only["id"])
    verdicts = [_verdict(text) for text in history]
    assert _deduplicated(verdicts) == ["queued", "running", "passed"], verdicts

    head = world.admin.pull(world.org, REPO, pr)["head"]["sha"]
    assert head == sha and f"at [`{head[:10]}`]" in final["body"]
    statuses = world.status_becomes(sha, "success")
    assert statuses[0]["status"] == "pending" and statuses[-1]["status"] == "success", statuses
    assert {s["context"] for s in statuses} == {"ccci/testme"}
    assert all(s["creator"]["login"] == world.bot for s in statuses)

    report = world.run_json(run)["report"]
    assert report["sha"] == head and report["status"] == "passed"
    checkout = next(s for s in report["steps"] if s["name"] == "checkout")
    assert f"HEAD is {head}" in checkout["stdout"]


def _verdict(text: str) -> str:
    match = re.search(r"^### \S+ (queued|running|passed|failed|error|canceled)", text, re.MULTILINE)
    return match.group(1) if match else text[:60]


def _deduplicated(items: list[str]) -> list[str]:
    """Collapse repeats: the queued comment may be rewritten (its queue position) before it runs."""
    return [item for i, item in enumerate(items) if i == 0 or items[i - 1] != item]
